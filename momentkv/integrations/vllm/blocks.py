"""KV blocks for a bounded request: a cache spec and a manager that cap each request's blocks.

Under a policy, a request's layout (see :mod:`momentkv.integrations.vllm.backend`) is its context at physical
indices ``0 .. C-1`` and at most ``budget`` generated tokens at ``C .. C+budget-1``; later tokens overwrite
victim slots. Its blocks therefore never need to reach past index ``C + budget - 1``. vLLM's scheduler
allocates a block whenever a request's token count crosses a block boundary; :class:`MomentKVManager` caps
that at the blocks of ``C + budget`` tokens, so a request stops taking blocks once its budget is full and
the scheduler admits more requests into the same KV space.

The manager sees request ids and token counts, not the backend's record of ``C``. It bounds ``C`` from the
scheduler's prefill boundary at the request's first allocation (``prefill_end = max(prompt, tokens - 1)``): a
fresh request's context is its prompt (``prefill_end``), a request recomputed after preemption re-prefills all
``prefill_end + 1`` of its tokens, so ``C <= prefill_end + 1`` always holds and the cap is the blocks of
``prefill_end + 1 + budget`` tokens: for a fresh request, one token more than it needs, which costs a block
only when ``prompt + budget`` is a multiple of the block size.

:class:`MomentKVSpec` is the full-attention spec with the budget added; the worker returns it for every
attention layer (:func:`install_spec`), and vLLM's registry maps it to the manager in the engine core
(:func:`register_spec`). Prefix caching is refused by the plugin, so no block is shared between requests.

With ``$MOMENTKV_VLLM_BLOCK_LOG`` set to a file, the manager appends one JSON line per request it frees:
its id, its context bound, the cap and the most blocks it held (read by the tests and the benchmark).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

BLOCK_LOG = "MOMENTKV_VLLM_BLOCK_LOG"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MomentKVSpec(FullAttentionSpec):
    """Full attention whose requests hold at most ``momentkv_budget`` generated tokens per KV head."""

    momentkv_budget: int = 0

    @classmethod
    def merge(cls, specs: list[MomentKVSpec]) -> MomentKVSpec:
        budgets = {spec.momentkv_budget for spec in specs}
        if len(budgets) != 1:
            raise ValueError(f"every momentkv layer of a KV cache group must hold one budget, got {sorted(budgets)}")
        return dataclasses.replace(super().merge(specs), momentkv_budget=budgets.pop())

    @property
    def prefix_cacheable(self) -> bool:
        return False


class MomentKVManager(FullAttentionManager):
    """vLLM's full-attention manager with each request's blocks capped at ``cdiv(C + 1 + budget, block_size)``
    (``C``: the request's prefill boundary at its first allocation; see the module docstring)."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: MomentKVSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.budget = kv_cache_spec.momentkv_budget
        self.context: dict[str, int] = {}  # request id -> bound on its context length
        self.peak: dict[str, int] = {}  # request id -> most blocks it held
        self.log = os.environ.get(BLOCK_LOG) or None

    def token_cap(self, request_id: str) -> int:
        return self.context[request_id] + self.budget

    def block_cap(self, request_id: str) -> int:
        return cdiv(self.token_cap(request_id), self.block_size)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        if not self.req_to_blocks.get(request_id):  # its first allocation (fresh, or after preemption)
            if prefill_end <= 0:
                raise RuntimeError("momentkv's block cap needs the scheduler's prefill boundary (prefix_cache_"
                                   "retention_interval must be 0, vLLM's default)")
            self.context[request_id] = prefill_end + 1
        cap = self.token_cap(request_id)
        return super().get_num_blocks_to_allocate(
            request_id, min(num_tokens, cap), new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, min(num_tokens_main_model, cap), apply_admission_cap, prefill_end)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        cap = self.token_cap(request_id)
        new = super().allocate_new_blocks(request_id, min(num_tokens, cap), min(num_tokens_main_model, cap))
        held = len(self.req_to_blocks[request_id])
        if held > self.block_cap(request_id):  # the base class may round up for its own reasons
            raise RuntimeError(f"momentkv: request {request_id} holds {held} blocks, over its cap "
                               f"{self.block_cap(request_id)}")
        self.peak[request_id] = max(self.peak.get(request_id, 0), held)
        return new

    def free(self, request_id: str) -> None:
        if self.log is not None and request_id in self.peak:
            record = {"request": request_id, "context_bound": self.context.get(request_id), "budget": self.budget,
                      "block_size": self.block_size, "cap": self.block_cap(request_id),
                      "peak": self.peak[request_id]}
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.context.pop(request_id, None)
        self.peak.pop(request_id, None)
        super().free(request_id)


def register_spec() -> None:
    """Map :class:`MomentKVSpec` to :class:`MomentKVManager` in vLLM's registry (vLLM's own specs first: the
    registry fills itself only while empty)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(MomentKVSpec, MomentKVManager, uniform_type_base_spec=FullAttentionSpec)


def install_spec(budget_of) -> None:
    """Make every decoder attention layer report :class:`MomentKVSpec` in this (worker) process while
    ``budget_of(vllm_config)`` gives a budget (``None``: no policy, vLLM's own spec); a layer whose attention
    backend is not momentkv's (``momentkv_evicts``) refuses, with ``PolicyError``."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_momentkv", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        budget = budget_of(vllm_config)
        if budget is not None and type(spec) is FullAttentionSpec:
            backend = getattr(self, "attn_backend", None)
            if not getattr(backend, "momentkv_evicts", False):  # its cache writes would ignore the capped blocks
                from momentkv.errors import PolicyError
                from momentkv.integrations.vllm import CUDA_BACKENDS

                name = backend.get_name() if hasattr(backend, "get_name") else backend
                raise PolicyError(f"momentkv's vLLM backend does not support the {name} attention backend of layer "
                                  f"{getattr(self, 'layer_name', '?')}: the plugin overrides CPU_ATTN, "
                                  f"{', '.join(CUDA_BACKENDS)}")
            fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
            spec = MomentKVSpec(**fields, momentkv_budget=budget)
        return spec

    get_kv_cache_spec._momentkv = True
    Attention.get_kv_cache_spec = get_kv_cache_spec
