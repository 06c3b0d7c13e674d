"""Cost of R-KV's redundancy scorer per call, by number of cached tokens, against the per-step attention scoring.

The redundancy compares every evictable key with every other (``O(n^2 d)`` per KV head), so it runs only when
the layer ranks its tokens: with ``cadence: k`` once every ``k`` decode steps. This script times one call at
SmolLM2-135M's shape (3 KV heads, head_dim 64) for several numbers of evictable tokens ``n``, and prints the
cost per decode step at a few cadences next to the attention pass every attention scorer pays each step
(``group_attention``, 9 query heads over the prompt and the cached tokens) and KeyDiff's ``O(n d)`` score.
Times are CPU time of this process on one thread (``time.process_time``), so that other jobs sharing the
machine slow the run down without inflating the numbers.

    python benchmarks/redundancy_cost.py [threads]
"""

from __future__ import annotations

import sys
import time

import torch

from momentkv.core.group_attention import group_attention
from momentkv.scoring import KeyDiff, Redundancy, ScoreContext

KV_HEADS, HEADS, HEAD_DIM, PROMPT = 3, 9, 64, 64


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def context(n: int) -> ScoreContext:
    keys = torch.randn(1, KV_HEADS, n, HEAD_DIM)
    positions = torch.arange(PROMPT, PROMPT + n).expand(1, KV_HEADS, n)
    return ScoreContext(attention=None, keys=keys, state=torch.zeros(1, KV_HEADS, n), positions=positions,
                        now=PROMPT + n - 1)


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    redundancy, keydiff = Redundancy(), KeyDiff()
    print(f"{threads} thread(s); 1 row, {KV_HEADS} KV heads, head_dim {HEAD_DIM}; CPU time per call in microseconds")
    print("| evictable tokens n | redundancy | per step, cadence 16 | per step, cadence 128 | keydiff "
          "| attention pass (every step) |")
    print("|---|---|---|---|---|---|")
    for n in (128, 256, 512, 1024, 2048):
        ctx = context(n)
        calls = max(20, 20000 // n)
        red = per_call_us(lambda: redundancy.update(ctx), calls)
        kd = per_call_us(lambda: keydiff.update(ctx), calls)
        query = torch.randn(1, HEADS, 1, HEAD_DIM)
        keys = torch.randn(1, KV_HEADS, PROMPT + n, HEAD_DIM)
        attn = per_call_us(lambda: group_attention(query, keys, None, HEAD_DIM**-0.5), calls * 4)
        print(f"| {n} | {red:.0f} | {red / 16:.1f} | {red / 128:.1f} | {kd:.0f} | {attn:.0f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
