"""Markdown table of a ``run_smollm2.sh`` output folder: scores with lm-eval's standard errors, wall times.

Usage: python benchmarks/lm_eval/table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (task, metric, header)
    ("momentkv_count", "lines_correct", "count: lines"),
    ("momentkv_count", "exact", "count: exact"),
    ("momentkv_recall", "groups_recalled", "recall: groups"),
    ("momentkv_recall", "exact", "recall: exact"),
    ("momentkv_tally", "words_correct", "tally: words"),
    ("momentkv_tally", "exact", "tally: total"),
]


def _score(task: dict, metric: str) -> str:
    value, stderr = task[f"{metric},none"], task[f"{metric}_stderr,none"]
    return f"{value:.2f} ± {stderr:.2f}" if isinstance(stderr, float) else f"{value:.2f}"


def _row(label: str, results: dict, seconds: str) -> str:
    stats = results["config"]["momentkv"]["stats"]
    cells = [_score(results["results"][task], metric) for task, metric, _ in COLUMNS]
    held = "yes" if stats["budget_held"] else "NO"
    budgets = ",".join(map(str, stats["budgets"])) or "-"
    return (f"| {label} | {' | '.join(cells)} | {stats['evicted']:,} | {budgets} / {held} | "
            f"{stats['max_generated_stored']} | {seconds} |")


def main(out: Path) -> None:
    walls = dict(line.split() for line in (out / "wall_seconds.txt").read_text().splitlines())
    print("| policy | " + " | ".join(h for _, _, h in COLUMNS)
          + " | evicted | budget / held | most generated kept | wall s |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    counts = set()
    # The full cache first, then by budget, then by name (the wall-time file lists runs in the order they ended).
    order = sorted(walls, key=lambda k: (k != "full", int(k.split("@")[1]) if "@" in k else 0, k))
    for label, seconds in ((label, walls[label]) for label in order):
        files = sorted((out / label).rglob("results_*.json"))
        if files:
            results = json.loads(files[-1].read_text())
            print(_row(label, results, seconds))
            counts |= {n["effective"] for n in results["n-samples"].values()}
    print(f"\ndocuments per task: {', '.join(map(str, sorted(counts)))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
