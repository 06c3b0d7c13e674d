"""``momentkv report``: one report of every pass saved against a reference (``momentkv eval --store``).

Passes of several runs, of several sessions and of peer toolkits (``benchmarks/peers``) that share the
reference are merged into the tables and plots ``momentkv eval`` writes. A pass saved with an error (a peer's
method that failed or gave NaN) is listed with its error instead of numbers.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

EXIT_USAGE = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="merge every pass saved against a reference into one report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="a reference folder inside a --store folder of momentkv eval")
    p.add_argument("--out", required=True, help="output folder (created; files in it are replaced)")
    p.add_argument("--baseline", default="recency", help="policy each KL is compared with in the tables")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=run)


def failures_section(failures: list[dict]) -> str:
    if not failures:
        return ""
    lines = ["## Passes that failed", "", "| pass | source | error |", "| --- | --- | --- |"]
    lines += [f"| {f['label']} | {f['source']} | {f['error'].replace('|', '/')} |" for f in failures]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from momentkv.eval.report import write_outputs
    from momentkv.eval.store import load_saved

    folder = Path(args.reference)
    try:
        results, failures = load_saved(folder, seed=args.seed)
    except FileNotFoundError as err:
        print(f"momentkv report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not results.results:
        print(f"momentkv report: error: {folder} holds no finished pass", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(x) for x in ["momentkv", "report", str(folder), "--out", str(out)])
    write_outputs(results, out, command=command, baseline=args.baseline)
    if failures:
        md = out / "results.md"
        md.write_text(md.read_text(encoding="utf-8") + "\n" + failures_section(failures), encoding="utf-8")
    print(f"wrote {out}/results.md ({len(results.results)} passes, {len(failures)} failed)")
    return 0
