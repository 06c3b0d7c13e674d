"""``momentkv needle``: can a policy still copy a fact the model generated D tokens ago?

Each instance teacher-forces one assistant turn, every token after the chat prompt fed one at a time as
generation: a fact ("The access code is 4831."), exactly D tokens of filler, then the fact's sentence again up
to the answer ("The access code is"); the answer's log-probability and exact match (greedy over the answer)
are scored, for the full cache and each policy at each budget (momentkv/eval/needle.py). Written into
``--out``: ``rows.jsonl`` (every row as it is computed: a rerun with the same folder skips the rows it
holds), ``results.csv`` and ``results.json`` (one raw row per policy, distance and instance), ``summary.md``
and ``summary.csv`` (means over instances with 95% bootstrap intervals) and ``recall_B<budget>.png``
(exact match and log-probability against distance, one line per policy at that budget). Bad input and an
output folder holding files this command did not write end with a message and exit code 2 before any work.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from momentkv.cli.command_line import typed_command
from momentkv.cli.outputs import Output, OutputPathError, check_output_folder, claim

EXIT_USAGE = 2
ROWS = "rows.jsonl"
NEEDLE = Output("needle", (ROWS, "results.csv", "results.json", "summary.md", "summary.csv", "recall_B*.png"),
                (ROWS,))
DEFAULT_INSTANCES = 20


def register(subparsers) -> None:
    p = subparsers.add_parser("needle", help="decode-time needle test: recall of a generated fact against distance",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", nargs="+", default=["recency.yaml", "moment.yaml"],
                   help="policies to test (built-in names or YAML files); the full cache is always run as well")
    p.add_argument("--budgets", nargs="+", type=int, default=[64],
                   help="decode budgets (generated tokens kept per layer and KV head); each replaces the policy's own")
    p.add_argument("--distances", nargs="+", type=int, default=[32, 64, 128, 256],
                   help="filler tokens D between the fact and the question")
    p.add_argument("--instances", type=int, default=None,
                   help=f"instances (fact, filler, question): generated from --seed (default {DEFAULT_INSTANCES}), "
                        "or the first N of --prompts (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated instances and of the bootstrap")
    p.add_argument("--prompts", default=None,
                   help="JSONL file of your own instances (fields question, answer; optional id, kind, request, lead, "
                        "end, filler) instead of generated ones")
    p.add_argument("--model", default="smollm2", help="model name or path (default: smollm2, offline)")
    p.add_argument("--batch-size", type=int, default=16, help="instances teacher-forced together")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or written by an earlier momentkv needle (its rows are reused)")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"momentkv needle: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check(args) -> str | None:
    for flag in ("instances", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            return f"--{flag.replace('_', '-')} must be positive, got {value}"
    bad = [d for d in args.distances if d < 0]
    if bad:
        return f"--distances are numbers of tokens >= 0, got {', '.join(map(str, bad))}"
    if len(set(args.distances)) != len(args.distances):
        return "--distances lists a distance twice"
    if len(set(args.budgets)) != len(args.budgets):
        return "--budgets lists a budget twice"
    return None


def _read_rows(path: Path) -> dict[str, dict]:
    """Rows an earlier run saved, by key; a line cut short by a killed run is skipped."""
    saved = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                saved[row["key"]] = row
    return saved


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv_text(rows: list[dict]) -> str:
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def run(args) -> int:
    import torch

    from momentkv.errors import PolicyError
    from momentkv.eval import needle
    from momentkv.eval.configs import build_configs

    problem = _check(args)
    if problem:
        return _fail(problem)
    try:
        out = check_output_folder(args.out, NEEDLE)
    except OutputPathError as err:
        return _fail(str(err))
    try:
        if args.prompts:
            instances = needle.load_instances(args.prompts)
            instances = instances[: args.instances] if args.instances else instances
        else:
            instances = needle.generate_instances(args.instances or DEFAULT_INSTANCES, args.seed)
        configs = build_configs(args.policies, args.budgets)
    except PolicyError as err:
        return _fail(str(err))
    from momentkv import models

    try:
        model, tokenizer = models.load(args.model)
        for instance in instances:  # a filler too short for the largest distance fails before any work
            needle.encode_instance(tokenizer, instance, max(args.distances))
    except PolicyError as err:
        return _fail(str(err))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    return _run(args, model, tokenizer, instances, configs, out)


def _run(args, model, tokenizer, instances, configs, out: Path) -> int:
    from tqdm.auto import tqdm

    from momentkv.eval import needle

    names = [ROWS, "results.csv", "results.json", "summary.md", "summary.csv"]
    names += [f"recall_B{b}.png" for b in args.budgets]
    claim(out, NEEDLE, names)
    saved = _read_rows(out / ROWS)
    distances = sorted(args.distances)
    labels = 1 + sum(c.label != needle.FULL_LABEL for c in configs)
    bar = tqdm(total=labels * len(distances) * len(instances), unit="row", desc="needle", dynamic_ncols=True,
               disable=args.no_progress)
    computed = []

    with open(out / ROWS, "a", encoding="utf-8") as sink:
        def keep(rows):
            computed.extend(rows)
            for row in rows:
                sink.write(json.dumps(row) + "\n")
            sink.flush()

        started = time.perf_counter()
        rows = needle.run_needle(model, tokenizer, instances, configs, distances, model_name=args.model,
                                 batch_size=args.batch_size, saved=saved, on_rows=keep, progress=bar)
        seconds = time.perf_counter() - started
    bar.close()
    summary = needle.summarize(rows, args.seed)
    command = typed_command(args)
    reused = len(rows) - len(computed)
    _write(out / "results.csv", _csv_text(rows))
    _write(out / "summary.csv", _csv_text(summary))
    meta = {"command": command, "model": args.model, "seed": args.seed, "distances": distances,
            "budgets": args.budgets, "policies": [c.label for c in configs], "batch_size": args.batch_size,
            "seconds": round(seconds, 1), "rows_computed": len(computed), "rows_reused": reused,
            "instances": [{"id": i.id, "kind": i.kind, "question": i.question, "answer": i.answer}
                          for i in instances]}
    _write(out / "results.json", json.dumps({**meta, "rows": rows, "summary": summary}, indent=1) + "\n")
    text = (f"# Decode-time needle\n\n`{command}`\n\nModel {args.model}; {len(instances)} instances; "
            f"{len(computed)} rows computed in {seconds:.0f} s, {reused} reused from an earlier run; the batches "
            f"of every row took {sum(r['seconds'] for r in rows):.0f} s in all.\n\n"
            + needle.markdown_summary(summary))
    _write(out / "summary.md", text)
    for budget in args.budgets:
        needle.plot_recall(summary, budget, out / f"recall_B{budget}.png",
                           title=f"decode-time needle, {args.model}, decode budget {budget}, "
                                 f"{len(instances)} instances")
    print(text)
    print(f"written to {out}")
    return 0
