"""Decode speed and stored KV cache of each built-in policy against the full cache, batch 1.

    python benchmarks/cost.py --new-tokens 192 --out benchmarks/fidelity/cost_cpu.json

Greedy decoding of the demo prompt (end-of-sequence suppressed) with every policy, interleaved: one step of
each policy in turn, so that other load on the machine slows every policy alike. Reports tokens/s over all
decode steps (prefill excluded) and over the steps after the budget filled (where eviction runs), and the
stored keys and values after the last step. ``DynamicCache`` is transformers' own cache through the same
(patched) attention function, which passes it straight to SDPA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POLICIES = ("full.yaml", "recency.yaml", "tova.yaml", "h2o.yaml", "scope.yaml", "moment.yaml")


def stepper(model, cache, ids, steps, suppressed):
    """A generator that decodes one token per ``next()``."""
    from momentkv.eval.stepping import run_steps, suppress

    chosen = []
    mask = torch.ones_like(ids)
    for step, logits, _ in run_steps(model, cache, ids, mask, steps, lambda s, _: chosen[s]):
        chosen.append(suppress(logits, suppressed).argmax(-1))
        yield step


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import momentkv
    from momentkv import models
    from momentkv.cli.demo_cmd import DEMO_PROMPT
    from transformers import DynamicCache

    model, tokenizer = models.load("smollm2")
    ids = tokenizer(models.chat_prompt(tokenizer, DEMO_PROMPT), return_tensors="pt", add_special_tokens=False)["input_ids"]
    suppressed = models.eos_token_ids(model, tokenizer)
    caches = {"DynamicCache": DynamicCache()}
    for name in POLICIES:  # each handle's cache keeps its own policy; the last patch stays installed
        caches[name] = momentkv.patch(model, name).new_cache()
    runs = {name: stepper(model, cache, ids, args.new_tokens, suppressed) for name, cache in caches.items()}
    seconds = {name: [] for name in caches}
    for _ in range(args.new_tokens):
        for name, run in runs.items():
            started = time.perf_counter()
            next(run)
            seconds[name].append(time.perf_counter() - started)
    rows = []
    for name, cache in caches.items():
        decode_s = seconds[name][1:]  # step 0 is the prefill
        row = {"policy": name, "decode_steps": len(decode_s), "tokens_per_s": len(decode_s) / sum(decode_s),
               "tokens_per_s_after_128": (len(decode_s[128:]) / sum(decode_s[128:])) if len(decode_s) > 128 else None,
               "prompt_tokens": ids.shape[1]}
        if hasattr(cache, "stats"):
            stats = cache.stats()
            row.update(kv_bytes=stats["kv_bytes"], state_bytes=stats["state_bytes"], stored=stats["stored"],
                       layers=len(stats["layers"]))
        else:
            row.update(kv_bytes=sum(l.keys.nbytes + l.values.nbytes for l in cache.layers))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
