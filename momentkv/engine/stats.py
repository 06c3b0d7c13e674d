"""What a layer reports: stored tokens, peak, evictions and bytes (per batch row and KV head)."""

from __future__ import annotations


def layer_stats(layer) -> dict:
    """The stats of one :class:`~momentkv.engine.layer.EvictingLayer`."""
    kv_bytes = 0 if layer.keys is None else layer.keys.nbytes + layer.values.nbytes
    prompt_stored = layer.context_slots
    if layer.plan.scope == "all":
        # Decode eviction reaches the prompt: count the prompt tokens still held (the most of any head).
        prompt_stored = int((layer.positions < layer.prompt_tokens).sum(-1).max()) if layer.stored else 0
    return {
        "layer": layer.plan.layer_idx,
        "seen": layer.seen,
        "stored": layer.stored,
        "prompt_stored": prompt_stored,
        "generated_stored": layer.stored - prompt_stored,
        "peak": layer.peak_slots,
        "evicted": layer.evicted,
        "budget": layer.plan.budget_at(layer.generated),
        "kv_bytes": kv_bytes,
        "state_bytes": layer.slots.bookkeeping_bytes() + layer.scoring.nbytes(),
    }
