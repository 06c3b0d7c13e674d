"""``momentkv bench``: speed and memory of policies against the full cache, measured side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from momentkv.cli.imports import add_import_option, import_modules

DEFAULT_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle."


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="tokens/s, KV bytes, peak memory and time split per policy")
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a local path / hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt every run continues (default: a story)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="generated tokens per run")
    p.add_argument("--policies", nargs="+", default=["full.yaml", "moment.yaml", "recency.yaml"],
                   help="built-in names or policy files to compare; the ratios are against full.yaml if listed, "
                   "else the unpatched model if run, else the first policy, and say which (attention-heavy: the "
                   "last one is measured)")
    p.add_argument("--budget", type=int, default=None, help="override every policy's decode budget")
    p.add_argument("--repeats", type=int, default=3, help="runs per policy and length (the median is reported)")
    p.add_argument("--unpatched", action="store_true", help="also time the model without momentkv")
    p.add_argument("--no-op-counts", dest="op_counts", action="store_false",
                   help="skip the untimed runs that count tensor operations per decode step (one per policy and "
                   "length, plus the unpatched model)")
    p.add_argument("--attention-heavy", action="store_true",
                   help="run the attention-heavy benchmark (32q/8kv heads, head_dim 128) instead")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768],
                   help="attention-heavy: cached tokens before decoding")
    p.add_argument("--total-budget", type=int, default=1024, help="attention-heavy: prompt + decode tokens kept")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for bench.csv, bench.png and bench.md (attention-heavy: .md and .json)")
    add_import_option(p)
    p.set_defaults(func=run)


def _policy_with_budget(name: str, budget: int | None):
    import momentkv

    policy = momentkv.load_policy(name)
    if budget is None or policy.decode is None:
        return policy
    data = policy.model_dump()
    data["decode"]["budget"] = budget
    return momentkv.load_policy(data)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from momentkv.errors import PolicyError

    if any(n <= 0 for n in args.lengths) or args.repeats <= 0 or (args.budget is not None and args.budget <= 0):
        print("momentkv bench: lengths, repeats and budget must be positive", file=sys.stderr)
        return 2
    problem = import_modules(args.imports)
    if problem:
        print(f"momentkv bench: {problem}", file=sys.stderr)
        return 2
    try:
        policies = [_policy_with_budget(p, args.budget) for p in args.policies]
    except PolicyError as err:
        print(f"momentkv bench: {err}", file=sys.stderr)
        return 2
    names = [p.name for p in policies]
    repeated = sorted({n for n in names if names.count(n) > 1} | ({"unpatched"} & set(names)))
    if repeated:
        print(f"momentkv bench: results are keyed by policy name and {', '.join(map(repr, repeated))} would be "
              "ambiguous; give each policy a distinct 'name' (and none the name 'unpatched')", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.attention_heavy:
        return _attention_heavy(args)

    from momentkv.bench import report
    from momentkv.bench.runner import UNPATCHED, counting_runs, run_matrix
    from momentkv.models import load

    try:
        model, tokenizer = load(args.model)
    except PolicyError as err:
        print(f"momentkv bench: {err}", file=sys.stderr)
        return 2
    inputs = tokenizer([args.prompt], return_tensors="pt")
    entries = ([UNPATCHED] if args.unpatched else []) + policies
    total = len(entries) * len(args.lengths) * args.repeats
    total += counting_runs(entries, args.lengths) if args.op_counts else 0
    with tqdm(total=total, desc="bench runs", unit="run") as bar:
        summaries = run_matrix(model, inputs, entries, args.lengths, args.repeats, progress=bar,
                               count_ops=args.op_counts)
    reference = report.pick_reference(([UNPATCHED] if args.unpatched else []) + names)
    table = report.rows(summaries, reference=reference)
    text = report.markdown_table(table)
    print(text)
    report.write_csv(table, args.out / "bench.csv")
    report.plot(table, args.out / "bench.png", f"{args.model}: tokens/s and KV bytes")
    (args.out / "bench.md").write_text(text + "\n")
    print(f"wrote {args.out / 'bench.csv'}, {args.out / 'bench.png'}, {args.out / 'bench.md'}")
    return 0


def _attention_heavy(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from momentkv.bench import attention_heavy

    total = len(args.contexts) * args.repeats * 2
    with tqdm(total=total, desc="attention-heavy runs", unit="run") as bar:
        rows = attention_heavy.run(contexts=args.contexts, budget=args.total_budget, repeats=args.repeats,
                                   policy=args.policies[-1] if args.policies else "moment.yaml", progress=bar)
    text = attention_heavy.markdown_table(rows)
    print(text)
    (args.out / "attention_heavy.md").write_text(text + "\n")
    (args.out / "attention_heavy.json").write_text(json.dumps(rows, indent=2))
    return 0
