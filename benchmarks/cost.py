"""Decode speed and stored KV cache of each built-in policy against the full cache, batch 1.

    python benchmarks/cost.py --new-tokens 256 --out benchmarks/fidelity/cost_cpu.json

Greedy decoding of the demo prompt (end-of-sequence suppressed) with each policy in turn; reports
tokens/s over the decode steps (prefill excluded), the stored keys and values after the last step, and the
unpatched model (transformers' DynamicCache) for the cost of the patch itself.
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


def decode(model, cache, ids, steps, suppressed):
    from momentkv.eval.stepping import run_steps, suppress

    chosen = []
    mask = torch.ones_like(ids)
    started = None
    for step, logits, _ in run_steps(model, cache, ids, mask, steps, lambda s, _: chosen[s]):
        if step == 0:
            started = time.perf_counter()  # decode steps only: prefill excluded
        chosen.append(suppress(logits, suppressed).argmax(-1))
    return steps - 1, time.perf_counter() - started


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
    rows = []
    steps, seconds = decode(model, DynamicCache(), ids, args.new_tokens, suppressed)
    rows.append({"policy": "unpatched", "decode_steps": steps, "seconds": seconds, "tokens_per_s": steps / seconds})
    print(json.dumps(rows[-1]), flush=True)
    for name in POLICIES:
        with momentkv.patched(model, name) as handle:
            cache = handle.new_cache()
            steps, seconds = decode(model, cache, ids, args.new_tokens, suppressed)
            stats = cache.stats()
        rows.append({"policy": name, "decode_steps": steps, "seconds": seconds, "tokens_per_s": steps / seconds,
                     "kv_bytes": stats["kv_bytes"], "state_bytes": stats["state_bytes"], "stored": stats["stored"],
                     "prompt_tokens": ids.shape[1], "layers": len(stats["layers"])})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
