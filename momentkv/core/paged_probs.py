"""Decode attention probabilities read in place from a paged KV cache (``paged_probs.cpp``), one native call per
layer on the CPU.

A serving engine keeps each request's keys in fixed-size blocks scattered through one pool. Scorers that fold
this step's attention need, per request and KV head, the softmax of the new query against every stored key,
averaged over the KV head's query group (:func:`momentkv.core.group_attention.group_attention`), at the slots
they score. As tensor operations that means gathering each request's blocks into one tensor (a copy of every
stored key), a batched matmul and a softmax over all of it; the native function reads the blocks where they lie
and returns only the scored slots' probabilities. Asked for it, the same call also writes the decode attention's
output (``sum_t p_t v_t`` per query head, the values read where they lie), so that an engine can skip its own
attention kernel and read the keys once. Built on first use for this CPU (``-march=native``, see
:mod:`momentkv.core.native_build`); where it cannot be, or for inputs it does not take (not float32, strides it
does not read), :meth:`PagedProbs.__call__` returns ``None`` and the caller keeps its tensor path.

Rounding: float32 products and sums in another order than torch's matmul, an ``exp`` within a few ulp and a double
sum in the softmax: the probabilities, and the output (a float32 sum in token order), are within float32
rounding of the exact ones (tested against float64), not bit for bit equal to the tensor path's.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import torch

from momentkv.core import native_build

_CPU = native_build.cpu_features()
# Tuned to this CPU only where its features key the build (a cache folder shared with another CPU must not hand
# this build over); elsewhere a generic build.
_FLAGS = ("-O3", *(("-march=native",) if _CPU else ()), "-fopenmp", "-fno-math-errno", "-shared", "-fPIC",
          "-std=c++17")
_STATUS = {  # the native function's refusals (nothing written): what was wrong with the indices it was given
    1: "the native paged attention was given impossible sizes",
    2: "a row's scored slots lie outside its stored tokens",
    4: "a query index lies outside the step's tokens",
    5: "a row stores more tokens (its length) than its block table holds",
    6: "a block id lies outside the cache's blocks",
}

LIBRARY = native_build.NativeFunction(
    "paged_probs.cpp", "momentkv_paged_probs", _FLAGS, "the native paged attention for scorers",
    "the attention scorers read is computed as tensor operations (same results up to rounding, slower)",
    key_extra=_CPU)


def _float_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


class PagedProbs:
    """The probabilities of decode queries over paged keys, at the slots a scorer folds.

    ``cache``: one layer's blocks ``(num_blocks, kv_heads, ...)``, float32, each ``(block, KV head)`` holding
    ``block_size * head_size`` keys first (row-major ``(block_size, head_size)``, or ``(head_size, block_size)``
    with ``transposed``) followed by anything (the values); the two leading strides may be any.
    """

    def __init__(self, block_size: int, head_size: int, transposed: bool):
        self.block_size, self.head_size, self.transposed = int(block_size), int(head_size), bool(transposed)
        self._block = (ctypes.c_int64 * 27)()
        self._lock = threading.Lock()

    def __call__(self, cache: torch.Tensor, query: torch.Tensor, tokens: torch.Tensor, blocks: torch.Tensor,
                 lengths: torch.Tensor, first: torch.Tensor, held: int, scaling: float,
                 output: torch.Tensor | None = None) -> torch.Tensor | None:
        """Probabilities ``(n, kv_heads, held)`` float32, or ``None`` where the native function is off or these
        inputs are not ones it reads or it ran out of memory (``output`` then untouched).

        Args:
            cache: see the class docstring.
            query: ``(num_tokens, heads, head_size)`` float32, rows contiguous; ``heads`` a multiple of kv_heads.
            tokens: ``(n,)`` int64, each row's query among ``query``'s tokens, distinct (each row writes its
                token's output; rows are computed in parallel).
            blocks: ``(n, m)`` int64, each row's blocks in order (physical index ``i`` lies in block
                ``blocks[r, i // block_size]`` at offset ``i % block_size``); every entry a block of ``cache``.
            lengths: ``(n,)`` int64, tokens stored per row (the softmax runs over indices ``0 .. length-1``).
            first: ``(n,)`` int64, the physical index of each row's first scored slot; slots ``first ..
                first + held - 1`` are returned.
            held: scored slots per row.
            scaling: the softmax scale of ``q . k``.
            output: ``(num_tokens, heads, head_size)`` float32, each head's ``head_size`` contiguous, or ``None``:
                where given, row ``tokens[r]`` receives each query head's attention output over the row's
                stored tokens (keys and values), the rest left as they are.
        """
        if not native_build.enabled():
            return None
        fn = LIBRARY.get()
        if fn is None:
            return None
        n = int(tokens.shape[0])
        kv_heads = cache.shape[1] if cache.dim() >= 2 else 0
        if not (cache.dim() >= 2 and cache.shape[0] > 0 and cache.dtype == torch.float32
                and query.dtype == torch.float32 and cache.device.type == "cpu"
                and query.device.type == "cpu" and query.dim() == 3 and query.stride(2) == 1
                and query.shape[2] == self.head_size and kv_heads > 0 and query.shape[1] % kv_heads == 0
                and cache[0, 0].numel() >= 2 * self.block_size * self.head_size and cache[0, 0].is_contiguous()):
            return None
        if any(t.device.type != "cpu" or t.dim() != 1 or t.numel() != n for t in (tokens, lengths, first)):
            return None
        if output is not None and not (output.dtype == torch.float32 and output.device.type == "cpu"
                                       and output.shape == query.shape and output.stride(2) == 1):
            return None
        index = [t.to(torch.int64).contiguous() for t in (tokens, lengths, first)]
        table = blocks.to(torch.int64)
        if (table.device.type != "cpu" or table.dim() != 2 or table.shape[0] != n
                or (table.shape[1] > 1 and table.stride(1) != 1)):
            return None
        out = torch.empty((n, kv_heads, held), dtype=torch.float32)
        if n == 0 or (held == 0 and output is None):
            return out.zero_()
        with self._lock:
            b = self._block
            b[0], b[1], b[2] = cache.data_ptr(), cache.stride(0), cache.stride(1)
            b[3], b[4], b[5], b[6] = kv_heads, self.block_size, self.head_size, int(self.transposed)
            b[7], b[8], b[9] = query.data_ptr(), query.stride(0), query.stride(1)
            b[10], b[11], b[12], b[13] = index[0].data_ptr(), n, table.data_ptr(), table.stride(0)
            b[14], b[15], b[16], b[17] = index[1].data_ptr(), index[2].data_ptr(), int(held), query.shape[1] // kv_heads
            b[18], b[19] = _float_bits(float(scaling)), out.data_ptr()
            b[20], b[21], b[22] = ((output.data_ptr(), output.stride(0), output.stride(1)) if output is not None
                                   else (0, 0, 0))
            # Checked by the C++ before it reads (not trusted): every index inside the tensors named here.
            b[23], b[24], b[25], b[26] = cache.shape[0], query.shape[0], table.shape[1], torch.get_num_threads()
            status = fn(b)
        if status in _STATUS:
            raise ValueError(f"momentkv: {_STATUS[status]}")
        return None if status else out
