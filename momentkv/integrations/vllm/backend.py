"""vLLM's CPU attention backend, ``CPU_ATTN``, with momentkv's decode eviction (registered by the plugin when a
policy is set).

The eviction is :mod:`momentkv.integrations.vllm.evicting`'s, over the CPU backend's own builder and impl. What
is particular to the CPU is where a layer's keys and values lie: each (block, KV head) of ``kv_cache``
``[blocks, kv_heads, block_size, 2 * head_size]`` holds its block's keys, then its values, the keys transposed
or not as the CPU attention's ISA packs them, probed once per layer through the backend's own write op; and
the scorers' attention is read in place by one native call per layer (:mod:`momentkv.core.paged_probs`; where
it cannot, no compiler or not float32, the keys are read back into one tensor and the softmax taken in torch).
"""

from __future__ import annotations

import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from momentkv.core.paged_probs import PagedProbs
from momentkv.core.paged_write import PagedWrite
from momentkv.errors import PolicyError
from momentkv.integrations.vllm.evicting import EvictingBuilder, EvictingImpl


class MomentKVMetadataBuilder(EvictingBuilder, CPUAttentionMetadataBuilder):
    """The CPU builder (see :class:`EvictingBuilder`)."""


def _probe_packing(isa: str, heads: int, head_size: int, block_size: int, dtype) -> bool:
    """Whether this ISA stores keys transposed per (block, KV head); values must be row-major. Checked by a
    write through the backend's op into a scratch block, one KV head at a time as the backend writes."""
    layer = torch.zeros(2, heads, block_size, 2 * head_size, dtype=dtype)
    kc, vc = layer.view(2, heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(1, heads, head_size).to(dtype)
    value = torch.randn(1, heads, head_size).to(dtype)
    slot = block_size + 3
    for h in range(heads):
        ops.cpu_attn_reshape_and_cache(key[:, h : h + 1], value[:, h : h + 1], kc[:, h : h + 1], vc[:, h : h + 1],
                                       torch.tensor([slot]), isa)
    if not torch.equal(vc[1, :, 3], value[0]):
        raise PolicyError(f"momentkv's vLLM backend cannot read values packed by the CPU attention ISA {isa!r}")
    if torch.equal(kc[1].reshape(heads, head_size, block_size)[:, :, 3], key[0]):
        return True
    if torch.equal(kc[1, :, 3], key[0]):
        return False
    raise PolicyError(f"momentkv's vLLM backend cannot read keys packed by the CPU attention ISA {isa!r}")


class MomentKVImpl(EvictingImpl, CPUAttentionBackendImpl):
    """The CPU impl (see :class:`EvictingImpl`): each (block, KV head) of the cache holds its block's keys, then
    its values, the keys transposed or not as the CPU attention's ISA packs them (probed once per layer)."""

    def _keys_transposed(self, layer, kv_cache: torch.Tensor) -> bool:
        return _probe_packing(layer.isa, kv_cache.shape[1], self.head_size, kv_cache.shape[2], kv_cache.dtype)

    def _paged_probs(self) -> PagedProbs:
        return PagedProbs(self.block_size, self.head_size, self.keys_transposed)

    def _paged_write(self) -> PagedWrite:
        return PagedWrite(self.block_size, self.head_size, self.keys_transposed)

    def _split(self, kv_cache: torch.Tensor):
        blocks, heads, bs, _ = kv_cache.shape
        halves = kv_cache.view(blocks, heads, 2, bs * self.head_size)
        keys = halves[:, :, 0].view(blocks, heads, *((self.head_size, bs) if self.keys_transposed else
                                                     (bs, self.head_size)))
        return keys, halves[:, :, 1].view(blocks, heads, bs, self.head_size)


class MomentKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with momentkv's eviction; it writes the KV cache itself (victim slots)."""

    forward_includes_kv_cache_update: bool = True
    momentkv_evicts: bool = True

    @staticmethod
    def get_impl_cls():
        return MomentKVImpl

    @staticmethod
    def get_builder_cls():
        return MomentKVMetadataBuilder
