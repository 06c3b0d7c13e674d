"""Paired per-document comparisons of `run_recall_far.sh` (or any `momentkv lm-eval --log_samples`) runs.

For each run folder of OUT and one task, against the full cache's run and against recency's at the same budget,
on the same documents: for a pass/fail metric (every value 0 or 1), the passes and McNemar's exact test
(`momentkv.eval.aggregate.mcnemar`: the documents only this policy passes / only the other passes, and the
two-sided p); for a graded one (a share, such as `lines_correct`), the mean and the paired difference of means
with its 95% bootstrap interval over documents (`momentkv.eval.aggregate.paired_difference`, seed 0).

Usage: python benchmarks/lm_eval/paired.py OUT TASK [METRIC]     (METRIC defaults to exact)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from momentkv.eval.aggregate import mcnemar, paired_difference


def _samples(folder: Path, task: str, metric: str) -> dict[int, float]:
    files = sorted(folder.rglob(f"samples_{task}_*.jsonl"))
    if not files:
        return {}
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return {row["doc_id"]: float(row[metric]) for row in rows}


def _wall(out: Path) -> dict[str, str]:
    path = out / "wall_seconds.txt"
    if not path.exists():
        return {}
    return dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)


def main(out: str, task: str, metric: str = "exact") -> None:
    root = Path(out)
    runs = {p.name: _samples(p, task, metric) for p in sorted(root.iterdir()) if p.is_dir()}
    runs = {label: s for label, s in runs.items() if s}
    wall = _wall(root)
    full = runs.get("full", {})
    binary = all(v in (0.0, 1.0) for samples in runs.values() for v in samples.values())

    def versus(samples: dict[int, float], other: dict[int, float], label: str, other_label: str) -> str:
        if not other or label == other_label:
            return "—"
        docs = sorted(set(samples) & set(other))
        a, b = np.array([samples[d] for d in docs]), np.array([other[d] for d in docs])
        return mcnemar(a, b).fmt() if binary else paired_difference(a, b, seed=0).fmt(2)

    compared = "only this / only {}, p" if binary else "this - {}, 95% interval"
    print(f"| run | documents | {task}: {metric} | vs full cache ({compared.format('full')}) | "
          f"vs recency ({compared.format('recency')}) | wall s |")
    print("|---|---:|---|---|---|---:|")
    order = sorted(runs, key=lambda k: (k != "full", int(k.split("@")[1]) if "@" in k else 0, k))
    for label in order:
        samples = runs[label]
        budget = label.split("@")[1] if "@" in label else None
        recency_label = f"recency@{budget}" if budget else None
        passed = sum(samples.values())
        score = f"{passed:.0f}/{len(samples)} ({passed / len(samples):.2f})" if binary else f"{passed / len(samples):.2f}"
        print(f"| {label} | {len(samples)} | {score} | "
              f"{versus(samples, full, label, 'full')} | "
              f"{versus(samples, runs.get(recency_label, {}), label, recency_label)} | {wall.get(label, '—')} |")


if __name__ == "__main__":
    main(*sys.argv[1:4])
