"""The share of a teacher-forced decode pass that is the prompt's prefill: what sharing it across policies saves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leaderboard/prefill_share.py [--policy moment.yaml] [--steps 16]

For each batch of 8 held-out prompts (as `momentkv eval` batches them): the prefill's wall time under the policy
and the mean time of the first decode steps, then the prefill's share of a pass of N = 1,024 steps estimated
from them. The first steps score (as in a real pass) but stay below the decode budget, so they never rank or
evict: later steps cost more than they do, and the estimate is an upper bound on the share.
"""

from __future__ import annotations

import argparse
import time

import momentkv
from momentkv import models
from momentkv.eval.batches import make_batches
from momentkv.eval.prompts import encode_prompts, load_prompts
from momentkv.eval.stepping import run_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="moment.yaml")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed after each prefill")
    p.add_argument("--new-tokens", type=int, default=1024, help="pass length the share is estimated for")
    args = p.parse_args()
    model, tokenizer = models.load("smollm2")
    encoded = encode_prompts(tokenizer, load_prompts(None, split="heldout"))
    prefill = decode = 0.0
    for batch in make_batches(encoded, 8, tokenizer.pad_token_id or 0, "cpu"):
        with momentkv.patched(model, args.policy) as handle:
            # The eval's own loop, told the pass is new_tokens long (so the cache scores as in a real pass),
            # stopped after the first steps: its first yield comes after the prefill, each next one after a step.
            steps = run_steps(model, handle.new_cache(), batch.input_ids, batch.attention_mask, args.new_tokens,
                              lambda _, logits: logits.argmax(-1))
            started = time.perf_counter()
            next(steps)
            seconds, started = time.perf_counter() - started, time.perf_counter()
            for _ in range(args.steps):
                next(steps)
            step = (time.perf_counter() - started) / args.steps
            steps.close()
        prefill, decode = prefill + seconds, decode + step * (args.new_tokens - 1)
        print(f"batch of {len(batch.rows)}, prompt width {batch.input_ids.shape[1]}: prefill {seconds:.1f} s, "
              f"one decode step {step:.3f} s")
    print(f"{args.policy}: prefill {prefill:.0f} s of an estimated {prefill + decode:.0f} s pass at N = "
          f"{args.new_tokens}: {100 * prefill / (prefill + decode):.1f}%")


if __name__ == "__main__":
    main()
