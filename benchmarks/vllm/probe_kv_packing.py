"""How the CPU attention backend of vLLM packs keys and values inside a KV block, on this machine.

    .venv-vllm/bin/python benchmarks/vllm/probe_kv_packing.py

Writes known keys and values through vLLM's own cache-write op (``cpu_attn_reshape_and_cache``, the one
``CPUAttentionBackendImpl.do_kv_cache_update`` calls) into a layer tensor of the backend's shape
``[num_blocks, kv_heads, block_size, 2 * head_size]``, then reads them back under two hypotheses: row-major
``[block_size, head_size]`` per (block, KV head), and transposed ``[head_size, block_size]``. Prints, per
dtype, the ISA vLLM picks and which reading recovers keys and values. No model, no engine: a few seconds.
"""

from __future__ import annotations

import torch
import vllm._custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

KV_HEADS, HEAD_SIZE, BLOCK_SIZE, BLOCKS = 3, 64, 128, 4


def probe(dtype: torch.dtype) -> dict:
    isa = _get_attn_isa(dtype, BLOCK_SIZE, HEAD_SIZE)
    layer = torch.zeros(BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, dtype=dtype)
    # The backend's own split (cpu_attn.py, forward and do_kv_cache_update).
    key_cache, value_cache = layer.view(BLOCKS, KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE).chunk(2, dim=2)
    slots = torch.tensor([0, 1, BLOCK_SIZE + 5, 3 * BLOCK_SIZE - 1])
    torch.manual_seed(0)
    key = torch.randn(len(slots), KV_HEADS, HEAD_SIZE).to(dtype)
    value = torch.randn(len(slots), KV_HEADS, HEAD_SIZE).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    def row_major(cache, block, offset):
        return cache[block, :, offset]

    def transposed(cache, block, offset):
        return cache[block].reshape(KV_HEADS, HEAD_SIZE, BLOCK_SIZE)[:, :, offset]

    found = {"isa": isa}
    for name, cache, written in (("keys", key_cache, key), ("values", value_cache, value)):
        for reading, read in (("row-major", row_major), ("transposed", transposed)):
            if all(torch.equal(read(cache, s // BLOCK_SIZE, s % BLOCK_SIZE), written[i])
                   for i, s in enumerate(slots.tolist())):
                found[name] = reading
        found.setdefault(name, "neither")
    return found


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{dtype}: {probe(dtype)}")


if __name__ == "__main__":
    main()
