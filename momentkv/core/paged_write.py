"""Decode tokens written into a paged KV cache in one native call per layer (``paged_write.cpp``), on the CPU.

A step of an evicting paged engine writes each decode row's new key and value into one slot per KV head (its
victim's, or the next free one while the budget fills), stamps the slot's sequence index and zeroes the slot's
scorer states. As tensor operations that is an indexed store per tensor (keys, values, positions, every state
pool), each with its own index arithmetic; here it is one loop over the ``rows x kv_heads`` slots. Built on first
use like :mod:`momentkv.core.paged_probs`; where it cannot be, or for tensors it does not take (not float32,
strides it does not read), :meth:`PagedWrite.__call__` returns ``False`` and the caller keeps its tensor path.
The cache then holds exactly the bits the tensor path would write.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from momentkv.core import native_build
from momentkv.core.paged_probs import _FLAGS as _PROBS_FLAGS

_FLAGS = tuple(flag for flag in _PROBS_FLAGS if flag != "-fopenmp")
LIBRARY = native_build.NativeFunction(
    "paged_write.cpp", "momentkv_paged_write", _FLAGS, "the native paged cache write",
    "decode tokens are written by indexed tensor stores (the same bits, slower)", key_extra=native_build.cpu_features())


def _rows(tensor: torch.Tensor, shape_tail, dtype) -> bool:
    """A CPU tensor of ``dtype`` whose last dimension is contiguous and whose trailing sizes are ``shape_tail``."""
    return (tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.dim() == 1 + len(shape_tail)
            and tuple(tensor.shape[1:]) == tuple(shape_tail) and tensor.stride(-1) == 1)


def _exactly(tensor: torch.Tensor, shape, dtype) -> bool:
    """A contiguous CPU tensor of ``shape`` and ``dtype`` (what the C++ reads with no strides)."""
    return (tensor.device.type == "cpu" and tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape)
            and tensor.is_contiguous())


class PagedWrite:
    """Writes one layer's decode tokens into their slots (see the module docstring).

    ``cache``: the layer's blocks ``(num_blocks, kv_heads, ...)``, float32, each ``(block, KV head)`` holding
    ``block_size * head_size`` keys (row-major, or ``(head_size, block_size)`` with ``transposed``) followed by as
    many values, row-major.
    """

    def __init__(self, block_size: int, head_size: int, transposed: bool):
        self.block_size, self.head_size, self.transposed = int(block_size), int(head_size), bool(transposed)
        self._block = (ctypes.c_int64 * 23)()
        self._lock = threading.Lock()

    def __call__(self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tokens: torch.Tensor,
                 slots: torch.Tensor, positions: torch.Tensor, now: torch.Tensor, pools: list[torch.Tensor]) -> bool:
        """Write, and return ``True``; or return ``False`` having written nothing (off, or tensors it does not take).

        Args:
            cache: see the class docstring.
            key, value: ``(num_tokens, kv_heads, head_size)`` float32, each head's ``head_size`` contiguous.
            tokens: ``(R,)`` int64, each row's token among ``key``'s.
            slots: ``(R, kv_heads)`` int64, the slot each row's token takes in each KV head (distinct per head, as
                a paged engine's requests own distinct slots).
            positions: ``(num_slots, kv_heads)`` int64: ``positions[slots[r, h], h] = now[r]``.
            now: ``(R,)`` int64, each row's sequence index.
            pools: float32 ``(num_slots, kv_heads)`` or ``(channels, num_slots, kv_heads)``, contiguous: zeroed at
                each ``(slots[r, h], h)``.
        """
        if not native_build.enabled():
            return False
        fn = LIBRARY.get()
        if fn is None:
            return False
        blocks, heads = (cache.shape[0], cache.shape[1]) if cache.dim() >= 2 else (0, 0)
        if blocks == 0 or heads == 0:
            return False
        rows, d, bs = int(tokens.shape[0]), self.head_size, self.block_size
        num_slots = blocks * bs
        if not (cache.dtype == torch.float32 and cache.device.type == "cpu"
                and cache[0, 0].numel() >= 2 * bs * d and cache[0, 0].is_contiguous()
                and _rows(key, (heads, d), torch.float32) and _rows(value, (heads, d), torch.float32)
                and key.shape[0] == value.shape[0]
                and _exactly(tokens, (rows,), torch.int64) and _exactly(slots, (rows, heads), torch.int64)
                and _exactly(positions, (num_slots, heads), torch.int64) and _exactly(now, (rows,), torch.int64)
                and all(p.dim() in (2, 3) and _exactly(p, (*p.shape[:-2], num_slots, heads), torch.float32)
                        for p in pools)):
            return False
        addresses = (ctypes.c_int64 * max(len(pools), 1))(*(p.data_ptr() for p in pools))
        channels = (ctypes.c_int64 * max(len(pools), 1))(*(p.shape[0] if p.dim() == 3 else 1 for p in pools))
        with self._lock:
            b = self._block
            b[0], b[1], b[2], b[3], b[4] = cache.data_ptr(), cache.stride(0), cache.stride(1), blocks, heads
            b[5], b[6], b[7] = bs, d, int(self.transposed)
            b[8], b[9], b[10] = key.data_ptr(), key.stride(0), key.stride(1)
            b[11], b[12], b[13] = value.data_ptr(), value.stride(0), value.stride(1)
            b[14], b[15], b[16] = tokens.data_ptr(), rows, key.shape[0]
            b[17], b[18], b[19] = slots.data_ptr(), positions.data_ptr(), now.data_ptr()
            b[20], b[21], b[22] = ctypes.addressof(addresses), ctypes.addressof(channels), len(pools)
            status = fn(b)
        if status == 1:
            raise ValueError("momentkv: the native paged write was given impossible sizes")
        if status == 2:
            raise ValueError("momentkv: a decode token or slot lies outside its tensor")
        return True
