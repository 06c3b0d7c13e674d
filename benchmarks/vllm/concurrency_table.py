"""The table of ``benchmarks/vllm/concurrency.sh``'s results (one JSON per configuration in a folder).

    python benchmarks/vllm/concurrency_table.py FOLDER > FOLDER/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["plain", "none", "moment", "moment-stock-attention", "recency"]
NAMES = {"plain": "plain vLLM (`VLLM_PLUGINS=none`)", "none": "momentkv plugin, no policy",
         "moment": "`moment.yaml`", "recency": "`recency.yaml`",
         "moment-stock-attention": "`moment.yaml`, vLLM's attention kernel (`MOMENTKV_VLLM_FUSED_ATTENTION=0`)"}


def main() -> None:
    folder = Path(sys.argv[1])
    runs = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    if "plain" not in runs:
        raise SystemExit(f"{folder}: no plain.json")
    plain = runs["plain"]
    first = next(iter(runs.values()))
    prompts = [r["prompt"] for r in first["per_request"]]
    print(f"{first['requests']} requests x {first['new_tokens']} tokens (prompts of {min(prompts)}-{max(prompts)} "
          f"tokens), KV space {first['blocks']} blocks of {first['block_size']} tokens "
          f"({first['blocks'] * first['block_size']:,} tokens)\n")
    print("| configuration | budget | wall s | output tok/s | vs plain | running at once (most / mean) | "
          "preemptions | peak blocks in use | blocks per request (most) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER)):
        r = runs[name]
        most = max(p["most_blocks"] for p in r["per_request"])
        print(f"| {NAMES.get(name, name)} | {r['budget'] or '-'} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {r['most_running']} / {r['mean_running']:.1f} | "
              f"{r['preemptions']} | {r['peak_blocks_in_use']} | {most} |")
    step_costs({name: runs[name] for name in [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER))})


def step_costs(runs: dict) -> None:
    """Median seconds per engine step, and per running request, by requests running: how a step's cost grows
    with the batch on this machine (where it grows in proportion, more requests at once add no tokens/s)."""
    buckets = [(1, 8), (9, 16), (17, 24), (25, 32)]
    rows = [(name, r["step_times"]) for name, r in runs.items() if r.get("step_times")]
    if not rows:
        return
    print("\nMedian step time in ms (per running request), by requests running after the step:\n")
    print("| configuration | " + " | ".join(f"{a}-{b} running" for a, b in buckets) + " |")
    print("|---|" + "---|" * len(buckets))
    for name, times in rows:
        cells = []
        for a, b in buckets:
            picked = sorted(t for n, t in times if a <= n <= b)
            if not picked:
                cells.append("-")
                continue
            mid = picked[len(picked) // 2]
            load = sorted(n for n, _ in times if a <= n <= b)[len(picked) // 2]
            cells.append(f"{mid * 1e3:.0f} ({mid * 1e3 / load:.1f}), {len(picked)} steps")
        print(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
