"""Time of one call of the decode scoring function (``group_attention``) at SmolLM2's decode shape.

    python benchmarks/scoring_micro.py [threads]
"""

import sys
import time

import torch

from momentkv.engine.group_attention import group_attention


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    b, heads, kv_heads, head_dim, cached = 1, 9, 3, 64, 220
    query = torch.randn(b, heads, 1, head_dim)
    key = torch.randn(b, kv_heads, cached, head_dim)
    for _ in range(50):
        group_attention(query, key, None, head_dim**-0.5)
    calls = 3000
    start = time.perf_counter()
    for _ in range(calls):
        group_attention(query, key, None, head_dim**-0.5)
    print(f"group_attention: {(time.perf_counter() - start) / calls * 1e6:.1f} us per call ({threads} thread(s))")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
