"""KL per window of steps: does a policy's lead over a baseline hold as the generation grows longer?

    python benchmarks/leaderboard/windows.py STORE/REFERENCE --budget 64 [--window 1024] [--baseline recency] \
        [--policies moment h2o ...]

Reads the pass files saved against one reference (``momentkv eval --store``) and splits each pass's per-step KL
``(P, N)`` into consecutive windows of ``--window`` steps. Per window it prints, over all prompts, each policy's
mean KL over its steps with eviction (the steps from the first eviction on that fall in the window) with its 95%
bootstrap interval, and its paired change against the baseline (``mean(a) / mean(b) - 1``, prompts resampled
jointly): the same estimators as ``momentkv report`` (``momentkv/eval/aggregate.py``), restricted to the window.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from momentkv.eval import passfile
from momentkv.eval.aggregate import bootstrap, per_prompt_means, relative_difference


def window_means(record: dict, start: int, stop: int):
    """Per-prompt mean KL ``(P,)`` over the steps in ``[start, stop)`` at or after each prompt's first eviction."""
    kl = record["kl"][:, start:stop]
    active = (record["active_from"] - start).clamp(min=0)
    return per_prompt_means(kl, active)


def passes_at(folder: Path, budget: int) -> dict[str, dict]:
    """``{policy name: pass record}`` for the finished momentkv passes at decode budget ``budget``."""
    if passfile.read_meta(folder) is None:
        raise ValueError(f"{folder} holds no finished reference (give a folder written by momentkv eval --store, "
                         "not the store itself)")
    found = {}
    for path in passfile.list_passes(folder):
        try:
            record = passfile.read_pass(path)
        except Exception as error:  # a truncated or foreign file: name it rather than fail with a traceback
            raise ValueError(f"cannot read the pass file {path}: {error}") from error
        if record.get("error") is None and record.get("memory") == "decode" and record.get("budget") == budget:
            found[record["name"]] = record
    return found


def table(folder: Path, budget: int, window: int, baseline: str, policies: list[str] | None, seed: int = 0) -> str:
    records = passes_at(folder, budget)
    if baseline not in records:
        raise ValueError(f"no pass of {baseline!r} at decode budget {budget} in {folder} (found: {sorted(records)})")
    names = policies or sorted(records)
    missing = [n for n in names if n not in records]
    if missing:
        raise ValueError(f"no pass of {missing} at decode budget {budget} in {folder} (found: {sorted(records)})")
    steps = records[baseline]["kl"].shape[1]
    lines = [f"| policy | steps | KL active | vs {baseline} |", "| --- | --- | --- | --- |"]
    for start in range(0, steps, window):
        stop = min(start + window, steps)
        base = window_means(records[baseline], start, stop)
        for name in names:
            values = window_means(records[name], start, stop)
            versus = "—" if name == baseline else _percent(relative_difference(values, base, seed))
            lines.append(f"| {name} | {start}–{stop - 1} | {bootstrap(values, seed).fmt()} | {versus} |")
    return "\n".join(lines)


def _percent(estimate) -> str:
    """The paired change as a percentage with its interval, or "—" where no prompt has both means."""
    if math.isnan(estimate.mean):
        return "—"
    return f"{100 * estimate.mean:+.1f}% [{100 * estimate.low:+.1f}, {100 * estimate.high:+.1f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="a reference folder written by momentkv eval --store")
    parser.add_argument("--budget", type=int, required=True, help="decode budget of the passes")
    parser.add_argument("--window", type=int, default=1024, help="steps per window (default 1024)")
    parser.add_argument("--baseline", default="recency")
    parser.add_argument("--policies", nargs="+", help="policy names, in order (default: every pass at the budget)")
    args = parser.parse_args(argv)
    if args.window < 1:
        print("windows.py: --window must be at least 1", file=sys.stderr)
        return 2
    try:
        print(table(args.reference, args.budget, args.window, args.baseline, args.policies))
    except (ValueError, FileNotFoundError) as error:
        print(f"windows.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
