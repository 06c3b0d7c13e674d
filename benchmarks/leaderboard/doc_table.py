"""The leaderboard page's summary table, read from a report that `momentkv report` wrote.

    python benchmarks/leaderboard/doc_table.py out/lb-1024/report/results.md [--budgets 64 128] [--order a b ...]

A report's results.md holds one table per prompt set ("all", "free", "grounded"); the page shows, per policy and
budget, the KL over the steps with eviction with its interval and the top-1 agreement over all prompts, the paired
change against the report's baseline over all prompts and each kind, and the slots the cache held. Rows follow
``--order`` within each budget (policy names; the rest after them, alphabetically); budgets in the order of
``--budgets``, or numerically (decode budgets, then totals) without it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

KINDS = ("all", "free", "grounded")


def read_sections(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{kind: (header, rows)}`` of each ``## <kind> prompts`` table."""
    sections, kind, header, rows = {}, None, None, []
    for line in text.splitlines():
        heading = re.match(r"^## (\w+) prompts\s*$", line)
        if heading or line.startswith("## "):
            if kind is not None and header:
                sections[kind] = (header, rows)
            kind, header, rows = (heading.group(1) if heading else None), None, []
            continue
        if kind is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("- "):
            rows.append(cells)
    if kind is not None and header:
        sections[kind] = (header, rows)
    return sections


def baseline_column(header: list[str]) -> tuple[int, str]:
    for i, name in enumerate(header):
        found = re.match(r"KL vs (.+) \(active\)", name)
        if found:
            return i, found.group(1)
    raise ValueError("no 'KL vs ... (active)' column: is this a momentkv report's results.md?")


def _budget_value(budget: str) -> tuple[int, int]:
    """Decode budgets before total budgets ('T n'), each in numeric order."""
    total = budget.startswith("T ")
    digits = budget[2:] if total else budget
    return (int(total), int(digits) if digits.isdigit() else 0)


def table(sections, order: list[str], budgets: list[str] | None, counts: dict[str, str]) -> str:
    header, rows = sections["all"]
    col = {name: i for i, name in enumerate(header)}
    rel, baseline = baseline_column(header)
    by_kind = {k: {(r[0], r[1]): r for r in sections[k][1]} for k in KINDS if k in sections}
    keys = [(r[0], r[1]) for r in rows if r[0] != "full" and (budgets is None or r[1] in budgets)]
    rank = {name: i for i, name in enumerate(order)}
    budget_rank = {b: i for i, b in enumerate(budgets or [])}
    keys.sort(key=lambda k: (budget_rank.get(k[1], len(budget_rank)), _budget_value(k[1]),
                             rank.get(k[0], len(rank)), k[0]))
    n = {k: counts.get(k, "?") for k in by_kind}
    lines = [f"| policy | budget | KL, all {n['all']} | top-1 | vs {baseline}, all | "
             + " | ".join(f"{k} ({n[k]})" for k in KINDS[1:] if k in by_kind) + " | KV slots (generated) |",
             "| --- " * (6 + sum(k in by_kind for k in KINDS[1:])) + "|"]
    for key in keys:
        row = by_kind["all"][key]
        cells = [key[0], key[1], row[col["KL active"]], row[col["top-1 active"]].split(" ")[0], row[rel]]
        cells += [by_kind[k][key][rel] if key in by_kind[k] else "—" for k in KINDS[1:] if k in by_kind]
        cells.append(row[col["KV slots (generated)"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="results.md of a momentkv report")
    p.add_argument("--budgets", nargs="+", default=None, help="budgets to show, in this order (e.g. 64 128, 'T 512')")
    p.add_argument("--order", nargs="+", default=[], help="policy names first, in this order")
    args = p.parse_args(argv)
    text = args.results.read_text(encoding="utf-8")
    found = re.search(r"(\d+) prompts \((\d+) free, (\d+) grounded\)", text)
    counts = dict(zip(KINDS, found.groups())) if found else {}
    sections = read_sections(text)
    if "all" not in sections:
        print(f"{args.results}: no '## all prompts' table", file=sys.stderr)
        return 2
    try:
        print(table(sections, args.order, args.budgets, counts))
    except ValueError as err:
        print(f"{args.results}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
