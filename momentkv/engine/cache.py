"""The evicting cache: one :class:`EvictingLayer` per model layer, behind transformers' ``Cache`` seam."""

from __future__ import annotations

from transformers.cache_utils import Cache

from momentkv.engine.layer import EvictingLayer
from momentkv.core.plan import LayerPlan


class EvictingCache(Cache):
    """A ``Cache`` whose layers hold the generated tokens to a policy's budget.

    ``get_seq_length()`` counts tokens *seen* (positions keep counting after eviction);
    ``get_query_offset()`` counts tokens *stored* in the mask's reference layer (where the query sits among
    the keys it attends to).
    """

    def __init__(self, plans: list[LayerPlan], policy_name: str = "custom", prompt_length: int | None = None):
        super().__init__(layers=[EvictingLayer(plan) for plan in plans])
        self.policy_name = policy_name
        # True only for a patched generate given a compile_config: transformers then compiles its decode steps,
        # which momentkv routes to eager until every layer has a fixed shape (momentkv.engine.compiled_decode).
        self.compile_decode = False
        if prompt_length is not None:
            self.expect(prompt_length)

    def expect(self, context_length: int, max_new_tokens: int | None = None) -> None:
        """What the next ``generate`` call will feed: the first ``context_length`` tokens are context (kept
        whole, however they are chunked), then at most ``max_new_tokens`` generated ones.

        A layer whose budget those tokens can never exceed skips scoring for this call: nothing would be
        evicted, and the attention runs exactly as in the unpatched model (bit-identical output).
        """
        for layer in self.layers:
            layer.expect(context_length, max_new_tokens)

    @property
    def is_compileable(self) -> bool:
        """Whether transformers may compile ``generate``'s decode steps with this cache (see ``compile_decode``)."""
        return self.compile_decode

    def fixed_shape(self) -> bool:
        """Whether the next single-token step keeps every layer's shapes (each budget full, see
        :meth:`EvictingLayer.fixed_shape`): the steps a compiled forward takes."""
        return all(layer.fixed_shape() for layer in self.layers)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].stored if layer_idx < len(self.layers) else 0

    def stats(self) -> dict:
        """Per-layer stats and totals: stored tokens, peak, evictions, bytes (see ``EvictingLayer.stats``)."""
        layers = [layer.stats() for layer in self.layers]
        batch_heads = 0
        for layer in self.layers:
            if layer.keys is not None:
                batch_heads = layer.keys.shape[0] * layer.keys.shape[1]
                break
        return {
            "policy": self.policy_name,
            "layers": layers,
            "seen": max((s["seen"] for s in layers), default=0),
            "stored": sum(s["stored"] for s in layers),
            "evicted": sum(s["evicted"] for s in layers),
            "kv_bytes": sum(s["kv_bytes"] for s in layers),
            "state_bytes": sum(s["state_bytes"] for s in layers),
            "batch_x_kv_heads": batch_heads,
        }
