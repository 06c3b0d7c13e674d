"""``momentkv eval``: how faithful each policy stays to the full cache, per budget, on a prompt set.

Every input is checked before any output exists: an unknown policy, a budget <= 0, an empty or malformed
prompt file, sampling settings out of range, a total budget that a prompt fills, or a model that cannot be
loaded ends with a message and exit code 2, and so does an output folder that holds files this command did
not write (:mod:`momentkv.cli.outputs`). Outputs are written to a staging folder and moved into ``--out``
only once complete; a previous run's files there are replaced, nothing else is touched. With ``--store DIR``
the reference and every finished pass are also saved under DIR, and a rerun loads them instead of
recomputing (a long run can be stopped and continued).
"""

from __future__ import annotations

import sys
from pathlib import Path

from momentkv.cli.command_line import typed_command
from momentkv.cli.imports import add_import_option
from momentkv.cli.outputs import EVAL, STORE, OutputPathError, check_output_folder, publish
from momentkv.user_modules import import_modules

EXIT_USAGE = 2
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure each policy's fidelity to the full cache",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", nargs="+", default=["recency.yaml", "tova.yaml", "h2o.yaml", "scope.yaml",
                                                        "moment.yaml"],
                   help="built-in policy names or YAML files (full.yaml is the reference and always included)")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="decode budgets in tokens; each replaces the policies' own (default: the policies' own)")
    p.add_argument("--total-budgets", nargs="+", type=int, default=None,
                   help="total KV tokens per layer and head (prompt + generated): scope-all policies get it as "
                        "their budget, prompt-intact ones the total minus each prompt's length (each prompt then "
                        "runs alone, batch size 1)")
    p.add_argument("--reference", choices=["greedy", "sample"], default="greedy",
                   help="how the full cache chooses the reference tokens (sample: one seeded stream per prompt)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"with --reference sample: temperature (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"with --reference sample: nucleus mass (default {DEFAULT_TOP_P})")
    p.add_argument("--store", default=None,
                   help="folder that keeps the reference and every pass; a rerun loads what it holds")
    p.add_argument("--prompts", default=None, help="JSONL prompt file (default: the built-in set)")
    p.add_argument("--split", choices=["tune", "heldout"], default=None, help="use only this split of the prompts")
    p.add_argument("--kind", choices=["free", "grounded"], default=None, help="use only this kind of prompt")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts (after filtering)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per prompt (default 256)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline, default), a local path or a hub id")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-free-running", action="store_true", help="skip free-running greedy decoding")
    p.add_argument("--no-full-replay", action="store_true",
                   help="skip the full cache's own replay (a check: its KL to a reference made at the same batch "
                        "size is 0)")
    p.add_argument("--baseline", default="recency", help="policy each KL is compared with in the table")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or written by an earlier momentkv eval (its files are "
                        "replaced; nothing else in it is touched)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, of torch and of a sampled reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_import_option(p)
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"momentkv eval: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_numbers(args) -> str | None:
    if args.new_tokens <= 0:
        return f"--new-tokens must be positive, got {args.new_tokens}"
    if args.batch_size <= 0:
        return f"--batch-size must be positive, got {args.batch_size}"
    if args.limit is not None and args.limit <= 0:
        return f"--limit must be positive, got {args.limit}"
    if args.budgets is not None and any(b <= 0 for b in args.budgets):
        bad = ", ".join(str(b) for b in args.budgets if b <= 0)
        return f"budgets must be positive numbers of tokens, got {bad}"
    if args.total_budgets is not None and any(b <= 0 for b in args.total_budgets):
        bad = ", ".join(str(b) for b in args.total_budgets if b <= 0)
        return f"total budgets must be positive numbers of tokens, got {bad}"
    if args.reference == "greedy" and (args.temperature is not None or args.top_p is not None):
        return "--temperature and --top-p apply to a sampled reference: add --reference sample"
    return None


def sampling_of(args):
    """The :class:`Sampling` that ``args`` ask for (None: greedy); raises ``PolicyError`` for bad values."""
    from momentkv.eval.sampling import Sampling

    if args.reference != "sample":
        return None
    return Sampling(temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                    top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p, seed=args.seed)


def run(args) -> int:
    import torch

    from momentkv.errors import PolicyError
    from momentkv.eval.configs import build_configs, build_total_configs
    from momentkv.eval.prompts import encode_prompts, load_prompts

    problem = _check_numbers(args)
    if problem:
        return _fail(problem)
    try:
        out = check_output_folder(args.out, EVAL)
        if args.store:
            check_output_folder(args.store, STORE, option="--store")
    except OutputPathError as err:
        return _fail(str(err))
    problem = import_modules(args.imports)
    if problem:
        return _fail(problem)
    sources = [p for p in args.policies if Path(p).stem != "full" or Path(p).is_file()]
    try:
        sampling = sampling_of(args)
        configs = build_configs(([] if args.no_full_replay else ["full.yaml"]) + sources, args.budgets)
        if args.total_budgets and args.budgets is None:  # only the total budgets were asked for
            configs = [c for c in configs if c.budget is None]
        records = load_prompts(args.prompts, split=args.split, kind=args.kind)
    except PolicyError as err:
        return _fail(str(err))
    records = records[: args.limit] if args.limit else records

    from momentkv import models

    try:
        model, tokenizer = models.load(args.model)
    except PolicyError as err:
        return _fail(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoded = encode_prompts(tokenizer, records)
    if args.total_budgets:
        try:
            configs += build_total_configs(sources, args.total_budgets, [len(e) for e in encoded],
                                           [r.id for r in records])
        except PolicyError as err:
            return _fail(str(err))
        if args.batch_size != 1 and any(c.memory == "total" for c in configs):
            # Prompt-intact policies get one decode budget per prompt; whole-cache ones would count a padded
            # row's padding against its total and start evicting (padding) at the longest prompt's step.
            print("momentkv eval: at a total budget every prompt runs alone (--batch-size 1): prompt-intact "
                  "policies have one decode budget per prompt, and padding would count against the total",
                  file=sys.stderr)
            args.batch_size = 1
    suppressed = models.eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    command = typed_command(args)
    return _evaluate(args, model, encoded, records, configs, suppressed, pad_id, out, command, sampling)


def _evaluate(args, model, encoded, records, configs, suppressed, pad_id, out: Path, command: str,
              sampling=None) -> int:
    from tqdm.auto import tqdm

    from momentkv.eval.report import write_outputs
    from momentkv.eval.runner import run_eval
    from momentkv.eval.store import SavedEvaluation

    store = None
    if args.store:
        store = SavedEvaluation.under(args.store, args.model, args.new_tokens, sampling, records, encoded,
                                      suppressed, args.batch_size)
        print(f"momentkv eval: reference and passes saved in {store.folder}", file=sys.stderr)
    results = run_eval(model, encoded, records, configs, args.new_tokens, suppressed, pad_id,
                       batch_size=args.batch_size, seed=args.seed, free_run=not args.no_free_running,
                       progress=not args.no_progress, model_name=args.model, sampling=sampling, store=store,
                       log=lambda line: tqdm.write(line, file=sys.stderr))
    try:
        publish(out, EVAL, lambda folder: write_outputs(results, folder, command=command, baseline=args.baseline))
    except OutputPathError as err:  # the folder changed during the run
        return _fail(str(err))
    print(f"wrote {out}/results.md, results.csv and plots")
    return 0
