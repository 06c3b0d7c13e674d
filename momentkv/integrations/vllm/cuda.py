"""vLLM's CUDA attention backends with momentkv's decode eviction: ``FLASH_ATTN`` and ``TRITON_ATTN``.

The eviction is :mod:`momentkv.integrations.vllm.evicting`'s, over these backends' own builder and impl; the
stock cache write (for prefill rows) and the stock attention call are theirs. What is particular to them is
where a layer's keys and values lie: both keep ``kv_cache`` as ``[num_blocks, kv_heads, block_size, 2 * hs]``,
each token's row holding its key in ``[..., :head_size]`` and its value in ``[..., hs : hs + head_size]``
(``hs`` is ``head_size``, or a padded size where a quantised mode keeps scales beside the values; quantised KV
is refused anyway). The scorers' attention is read from a gathered copy of the stored keys (the native reader
of :mod:`momentkv.core.paged_probs` is the CPU's).

The eviction indexes the cache from Python on every step, so these builders declare no CUDA-graph support:
vLLM then captures only the piecewise graphs around the attention layers, which run eagerly.

Imported only in a process on the CUDA platform (the plugin's :func:`~momentkv.integrations.vllm.register_backend`).
Not yet run on a GPU: ``benchmarks/gpu_vllm.sh`` runs the end-to-end tests and the benchmark where there is one.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from momentkv.integrations.vllm.evicting import EvictingBuilder, EvictingImpl


class _RowMajorKV:
    """Where ``FLASH_ATTN`` and ``TRITON_ATTN`` keep a layer's keys and values (see the module docstring)."""

    head_size: int

    def _keys_transposed(self, layer, kv_cache: torch.Tensor) -> bool:
        return False

    def _split(self, kv_cache: torch.Tensor):
        return split_row_major(kv_cache, self.head_size)


def split_row_major(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(blocks, kv_heads, block_size, head_size)``, views of ``kv_cache``
    ``[blocks, kv_heads, block_size, 2 * hs]`` whose token rows hold a key, then a value, ``hs >= head_size``
    apart."""
    half = kv_cache.shape[-1] // 2
    if half < head_size:
        raise ValueError(f"a KV cache row of {kv_cache.shape[-1]} cannot hold a key and a value of {head_size}")
    return kv_cache[..., :head_size], kv_cache[..., half : half + head_size]


def _evicting(stock_backend: type, stock_impl: type, stock_builder: type, name: str) -> type:
    """``stock_backend`` with momentkv's eviction: its impl and builder under the mixins, a backend that writes the
    KV cache itself (victim slots), takes no fused cache write from a model, and declares no CUDA-graph support
    (see the module docstring). The classes are this module's ``MomentKV{name}Backend``, ``...Impl`` and
    ``...Builder``, the names vLLM's registry is given."""

    def never(cls, *args, **kwargs) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER

    impl = type(f"MomentKV{name}Impl", (_RowMajorKV, EvictingImpl, stock_impl), {"__module__": __name__})
    builder = type(f"MomentKV{name}Builder", (EvictingBuilder, stock_builder),
                   {"__module__": __name__, "_cudagraph_support": AttentionCGSupport.NEVER,
                    "get_cudagraph_support": classmethod(never)})
    backend = type(f"MomentKV{name}Backend", (stock_backend,), {
        "__module__": __name__,
        "__doc__": f"``{stock_backend.get_name()}`` with momentkv's eviction.",
        "forward_includes_kv_cache_update": True,
        "supports_kv_cache_update_bypass": False,  # no fused op may write the cache around the victim slots
        "momentkv_evicts": True,
        "get_impl_cls": staticmethod(lambda: impl),
        "get_builder_cls": staticmethod(lambda: builder),
    })
    return backend


MomentKVFlashBackend = _evicting(FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder, "Flash")
MomentKVFlashImpl = MomentKVFlashBackend.get_impl_cls()
MomentKVFlashBuilder = MomentKVFlashBackend.get_builder_cls()
MomentKVTritonBackend = _evicting(TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder, "Triton")
MomentKVTritonImpl = MomentKVTritonBackend.get_impl_cls()
MomentKVTritonBuilder = MomentKVTritonBackend.get_builder_cls()
