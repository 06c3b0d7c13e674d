"""``momentkv report``: one report of every pass saved against a reference (``momentkv eval --store``).

Passes of several runs, of several sessions and of peer toolkits (``benchmarks/peers``) that share the
reference are merged into the tables and plots ``momentkv eval`` writes. A pass saved with an error (a peer's
method that failed or gave NaN) is listed with its error instead of numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from momentkv.cli.command_line import typed_command
from momentkv.cli.outputs import REPORT, OutputPathError, check_output_folder, publish

EXIT_USAGE = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="merge every pass saved against a reference into one report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="a reference folder inside a --store folder of momentkv eval")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or written by an earlier momentkv report (its files are "
                        "replaced; nothing else in it is touched)")
    p.add_argument("--baseline", default="recency", help="policy each KL is compared with in the tables")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--bench", default=None, help="a momentkv bench CSV: adds KL against tokens/s (Pareto front)")
    p.add_argument("--bench-budget", type=int, default=None,
                   help="the decode budget the bench CSV was measured at (required with --bench)")
    p.set_defaults(func=run)


def failures_section(failures: list[dict]) -> str:
    if not failures:
        return ""
    lines = ["## Passes that failed", "", "| pass | source | error |", "| --- | --- | --- |"]
    lines += [f"| {f['label']} | {f['source']} | {f['error'].replace('|', '/')} |" for f in failures]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from momentkv.eval.report import plot_fidelity_vs_speed, read_bench, write_outputs
    from momentkv.eval.store import load_saved

    if (args.bench is None) != (args.bench_budget is None):
        print("momentkv report: error: --bench and --bench-budget go together", file=sys.stderr)
        return EXIT_USAGE
    if args.bench is not None and not Path(args.bench).is_file():
        print(f"momentkv report: error: {args.bench}: no such bench CSV", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = check_output_folder(args.out, REPORT)
    except OutputPathError as err:
        print(f"momentkv report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(args.reference)
    try:
        results, failures = load_saved(folder, seed=args.seed)
    except FileNotFoundError as err:
        print(f"momentkv report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not results.results:
        print(f"momentkv report: error: {folder} holds no finished pass", file=sys.stderr)
        return EXIT_USAGE
    command = typed_command(args)

    def write(folder: Path) -> None:
        write_outputs(results, folder, command=command, baseline=args.baseline)
        md = folder / "results.md"
        extra = failures_section(failures)
        if args.bench is not None:
            front = plot_fidelity_vs_speed(results, read_bench(Path(args.bench)), args.bench_budget,
                                           folder / f"fidelity_vs_speed_B{args.bench_budget}.png")
            extra += (f"\n## Fidelity against speed at decode budget {args.bench_budget}\n\nSpeeds from "
                      f"{args.bench}. Pareto front (no other policy both faster and more faithful): "
                      f"{', '.join(front) or 'none'}.\n")
        if extra:
            md.write_text(md.read_text(encoding="utf-8") + "\n" + extra, encoding="utf-8")

    try:
        publish(out, REPORT, write)
    except OutputPathError as err:  # the folder changed while the report was made
        print(f"momentkv report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}/results.md ({len(results.results)} passes, {len(failures)} failed)")
    return 0
