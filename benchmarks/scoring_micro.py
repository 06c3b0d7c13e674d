"""Time of one layer's decode attention at SmolLM2's decode shape, with and without the scores.

    python benchmarks/scoring_micro.py [threads] [cached tokens]

Three ways to get a decode step's attention output, per layer call (median of 5 blocks of 1000 calls):

* ``sdpa``: ``F.scaled_dot_product_attention`` alone with ``enable_gqa``, as transformers calls it when there is
  no mask (no scores);
* ``sdpa + group_attention``: SDPA, then the scores in a second pass over the keys (how the engine scored
  before the single pass);
* ``attend + group_mean``: the engine's single pass, output and scores from one softmax
  (:func:`momentkv.core.group_attention.attend`).
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from momentkv.core.group_attention import attend, group_attention, group_mean


def per_call_us(fn, calls: int = 1000, blocks: int = 5) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(threads: int = 1, cached: int = 220) -> None:
    torch.set_num_threads(threads)
    b, heads, kv_heads, head_dim = 1, 9, 3, 64  # SmolLM2-135M
    scaling = head_dim**-0.5
    query = torch.randn(b, heads, 1, head_dim)
    key, value = torch.randn(b, kv_heads, cached, head_dim), torch.randn(b, kv_heads, cached, head_dim)

    def sdpa():
        return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)

    def two_passes():
        sdpa()
        return group_attention(query, key, None, scaling)

    def single_pass():
        _, probs = attend(query, key, value, None, scaling)
        return group_mean(probs[:, :, :, -1])

    for name, fn in (("sdpa", sdpa), ("sdpa + group_attention", two_passes), ("attend + group_mean", single_pass)):
        print(f"{name:>24}: {per_call_us(fn):7.1f} us per call ({threads} thread(s), {cached} cached tokens)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
