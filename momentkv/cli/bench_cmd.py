"""``momentkv bench``: speed and memory of policies against the full cache, measured side by side.

Bad numbers, policies, ``--import`` modules and an output folder that cannot take the results (a file, or a
folder holding files this command did not write) end with a message and exit code 2 before any run. The
results are written into ``--out`` once every run has finished; a previous run's files there are replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from momentkv.cli.imports import add_import_option
from momentkv.cli.outputs import BENCH, OutputPathError, check_output_folder, publish
from momentkv.user_modules import import_modules

DEFAULT_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle."


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="tokens/s, KV bytes, peak memory and time split per policy",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a local path / hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt every run continues (default: a story)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="generated tokens per run")
    p.add_argument("--policies", nargs="+", default=["full.yaml", "moment.yaml", "recency.yaml"],
                   help="built-in names or policy files to compare; the ratios are against full.yaml if listed, "
                   "else the unpatched model if run, else the first policy, and say which (attention-heavy: the "
                   "last one is measured)")
    p.add_argument("--compiled", nargs="+", default=[], metavar="POLICY",
                   help="also run these policies with model.forward = torch.compile(model.forward) (rows named "
                   "POLICY+compiled): the steps after the budget is full run compiled; compiled once, in an untimed "
                   "warm-up whose compile time is reported apart")
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
                   help="folder for bench.csv, bench.png and bench.md (attention-heavy: .md and .json): new, empty, "
                   "or written by an earlier momentkv bench (its files are replaced; nothing else is touched)")
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
    try:
        args.out = check_output_folder(args.out, BENCH)
    except OutputPathError as err:
        print(f"momentkv bench: error: {err}", file=sys.stderr)
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
    try:
        compiled_policies = [_policy_with_budget(p, args.budget) for p in args.compiled]
    except PolicyError as err:
        print(f"momentkv bench: {err}", file=sys.stderr)
        return 2
    names = [p.name for p in policies]
    repeated = sorted({n for n in names if names.count(n) > 1} | ({"unpatched"} & set(names)))
    if repeated:
        print(f"momentkv bench: results are keyed by policy name and {', '.join(map(repr, repeated))} would be "
              "ambiguous; give each policy a distinct 'name' (and none the name 'unpatched')", file=sys.stderr)
        return 2
    if args.attention_heavy:
        return _attention_heavy(args)

    from momentkv.bench import report
    from momentkv.bench.compiled import Compiled
    from momentkv.bench.runner import UNPATCHED, counting_runs, run_matrix
    from momentkv.models import load

    try:
        model, tokenizer = load(args.model)
    except PolicyError as err:
        print(f"momentkv bench: {err}", file=sys.stderr)
        return 2
    inputs = tokenizer([args.prompt], return_tensors="pt")
    entries = ([UNPATCHED] if args.unpatched else []) + policies + [Compiled(p) for p in compiled_policies]
    total = len(entries) * len(args.lengths) * args.repeats + len(compiled_policies)
    total += counting_runs(entries, args.lengths) if args.op_counts else 0
    try:
        with tqdm(total=total, desc="bench runs", unit="run") as bar:
            summaries = run_matrix(model, inputs, entries, args.lengths, args.repeats, progress=bar,
                                   count_ops=args.op_counts)
    except PolicyError as err:  # a --compiled policy without fixed shapes, refused by its first generate
        print(f"momentkv bench: {err}", file=sys.stderr)
        return 2
    reference = report.pick_reference(([UNPATCHED] if args.unpatched else []) + names)
    table = report.rows(summaries, reference=reference)
    text = report.markdown_table(table)
    print(text)

    def write(folder: Path) -> None:
        report.write_csv(table, folder / "bench.csv")
        report.plot(table, folder / "bench.png", f"{args.model}: tokens/s and KV bytes")
        (folder / "bench.md").write_text(text + "\n")

    if _publish(args.out, write):
        return 2
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

    def write(folder: Path) -> None:
        (folder / "attention_heavy.md").write_text(text + "\n")
        (folder / "attention_heavy.json").write_text(json.dumps(rows, indent=2))

    return 2 if _publish(args.out, write) else 0


def _publish(out: Path, write) -> bool:
    """Write the results into ``out`` (see :func:`momentkv.cli.outputs.publish`); True if that was refused."""
    try:
        publish(out, BENCH, write)
    except OutputPathError as err:  # the folder changed during the runs
        print(f"momentkv bench: error: {err}", file=sys.stderr)
        return True
    return False
