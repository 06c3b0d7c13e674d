"""``momentkv tune``: search the policy space for the most faithful policy at one budget, then confirm it.

Trials run on the tune split at a cheap proxy (``--proxy-tokens``, ``--proxy-prompts``); the winner and the
baselines then run on the held-out split at ``--new-tokens``. Every policy is compared at equal peak memory:
one with cadence ``c`` gets the decode budget ``B - (c - 1)``, so that it never holds more than ``B`` tokens. A
trial that never evicted on the proxy prompts is pruned (it measured nothing). Written into ``--out``:
``best.yaml`` (the winning policy, its held-out KL and interval in a comment), ``tune.md`` (the best trials
and the confirmation), ``summary.json`` (strict JSON: an estimate that has no value is null),
``study.db`` (the Optuna study: rerunning the same command resumes it) and ``store/`` (the references and
passes). Bad input, lengths at which nothing would be evicted, and an output folder that holds files this
command did not write end with a message and exit code 2 before any work.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

from momentkv.cli.command_line import typed_command
from momentkv.cli.outputs import TUNE, OutputPathError, check_output_folder, claim

EXIT_USAGE = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search the policy space (Optuna) and confirm the winner on held-out prompts",
                              description=__doc__.split("\n\n")[0])
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=int,
                        help="decode budget: the most generated tokens any policy holds per layer and KV head "
                             "(a cadence c gets decode.budget B - (c - 1))")
    budget.add_argument("--total-budget", type=int,
                        help="total KV tokens (prompt + generated), the most any policy holds; the space may then "
                             "search scope: all")
    p.add_argument("--space", default=None, help="search-space YAML (default: momentkv/tune/default_space.yaml)")
    p.add_argument("--trials", type=int, default=40, help="finished trials the study should hold (resumes count)")
    p.add_argument("--proxy-tokens", type=int, default=256, help="generated tokens per prompt during the search")
    p.add_argument("--proxy-prompts", type=int, default=8, help="tune-split prompts used during the search")
    p.add_argument("--new-tokens", type=int, default=1024, help="generated tokens per prompt in the confirmation")
    p.add_argument("--confirm-prompts", type=int, default=None, help="held-out prompts in the confirmation (all)")
    p.add_argument("--baselines", nargs="+", default=["recency.yaml", "moment.yaml"],
                   help="policies the winner is compared with on the held-out prompts")
    p.add_argument("--prompts", default=None, help="JSONL prompt file with tune and heldout splits (default: built-in)")
    p.add_argument("--reference", choices=["greedy", "sample"], default="sample",
                   help="how the full cache chooses the reference tokens (default: sample)")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled reference (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass of the sampled reference (default 0.95)")
    p.add_argument("--model", default="smollm2", help="model name or path (default: smollm2, offline)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per batch (also the pruning granularity)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the reference and the bootstrap")
    p.add_argument("--name", default="tuned", help="name of the winning policy")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or written by an earlier momentkv tune (rerunning with the "
                        "same one resumes the study)")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"momentkv tune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check(args) -> str | None:
    for flag in ("budget", "total_budget", "trials", "proxy_tokens", "proxy_prompts", "new_tokens", "batch_size",
                 "confirm_prompts"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            return f"--{flag.replace('_', '-')} must be positive, got {value}"
    if args.budget is not None:
        # A replay of N tokens feeds N - 1 of them to the cache; a policy that holds B evicts from the B + 1st on.
        for flag in ("proxy_tokens", "new_tokens"):
            value = getattr(args, flag)
            if value < args.budget + 2:
                return (f"--{flag.replace('_', '-')} {value} never fills a decode budget of {args.budget}: no policy "
                        f"would evict; use at least {args.budget + 2}")
    return None


def _fills(encoded: list[list[int]], tokens: int, total: int) -> bool:
    """Whether one of the prompts fills ``total`` (prompt + the ``tokens - 1`` generated tokens fed)."""
    return any(len(e) + tokens - 1 > total for e in encoded)


def _spread(records, n: int):
    """``n`` records taken alternately from each kind, so a proxy keeps free and grounded prompts."""
    by_kind = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    out, queues = [], [list(v) for v in by_kind.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return [r for r in records if r in out]


def run(args) -> int:
    import torch

    from momentkv.errors import PolicyError
    from momentkv.eval.prompts import load_prompts
    from momentkv.eval.sampling import Sampling
    from momentkv.policy import load_policy
    from momentkv.tune.space import held_budget, load_space
    from momentkv.tune.study import at_peak

    problem = _check(args)
    if problem:
        return _fail(problem)
    try:
        out = check_output_folder(args.out, TUNE)
    except OutputPathError as err:
        return _fail(str(err))
    try:
        space = load_space(args.space)
        tune = _spread(load_prompts(args.prompts, split="tune"), args.proxy_prompts)
        heldout = load_prompts(args.prompts, split="heldout")
        heldout = heldout[: args.confirm_prompts] if args.confirm_prompts else heldout
        for baseline in args.baselines:
            # An unknown or invalid baseline, or one whose cadence leaves no budget, fails before the model loads.
            policy = load_policy(baseline)
            if policy.decode is not None:
                held_budget(args.total_budget or args.budget, policy.decode.cadence)
                if args.budget is not None:
                    at_peak(policy, args.budget, "decode")
        baselines = list(args.baselines)
        sampling = Sampling(args.temperature, args.top_p, args.seed) if args.reference == "sample" else None
    except PolicyError as err:
        return _fail(str(err))
    if importlib.util.find_spec("optuna") is None:
        return _fail("momentkv tune needs Optuna: pip install 'momentkv[tune]'")
    from momentkv import models

    try:
        model, tokenizer = models.load(args.model)
    except PolicyError as err:
        return _fail(str(err))
    return _search(args, model, tokenizer, space, tune, heldout, baselines, sampling, out,
                   torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))


def _search(args, model, tokenizer, space, tune, heldout, baselines, sampling, out: Path, device) -> int:
    from tqdm.auto import tqdm

    from momentkv import models
    from momentkv.eval.prompts import encode_prompts
    from momentkv.eval.store import SavedEvaluation
    from momentkv.policy import dump_policy, load_policy
    from momentkv.tune import study as tuning

    model.to(device)
    log = lambda line: tqdm.write(line, file=sys.stderr)  # noqa: E731
    memory = "total" if args.total_budget else "decode"
    budget = args.total_budget or args.budget
    encoded = encode_prompts(tokenizer, tune)
    held_encoded = encode_prompts(tokenizer, heldout)
    suppressed = models.eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch_size = 1 if memory == "total" else args.batch_size
    if memory == "total":
        for flag, prompts in (("proxy_tokens", encoded), ("new_tokens", held_encoded)):
            tokens = getattr(args, flag)
            if not _fills(prompts, tokens, budget):
                split = "tune" if flag == "proxy_tokens" else "held-out"
                return _fail(f"no {split} prompt fills the total budget {budget} with --{flag.replace('_', '-')} "
                             f"{tokens}: no policy would evict; raise it or lower --total-budget")
    claim(out, TUNE, ["study.db", "store", "best.yaml", "tune.md", "summary.json"])
    text = Path(args.space).read_text() if args.space else space.source
    setup = tuning.Setup(model_name=args.model, budget=budget, memory=memory, proxy_tokens=args.proxy_tokens,
                         proxy_prompts=[r.id for r in tune], space=text, seed=args.seed)
    try:
        study = tuning.open_study(out, setup, args.seed)
    except tuning.TuneInputError as err:
        return _fail(str(err))
    started = time.perf_counter()
    store = SavedEvaluation.under(out / "store", args.model, args.proxy_tokens, sampling, tune, encoded, suppressed,
                                  batch_size)
    reference, _ = tuning.proxy_reference(model, store, encoded, tune, args.proxy_tokens, suppressed, pad_id,
                                          batch_size, sampling)
    objective = tuning.objective_fn(model, space, setup, reference, encoded, pad_id, batch_size, log=log)
    todo = max(0, args.trials - tuning.finished(study))
    log(f"momentkv tune: {tuning.finished(study)} trials already finished, {todo} to run "
        f"({len(tune)} tune prompts x {args.proxy_tokens} tokens each)")
    bar = tqdm(total=todo, unit="trial", desc="tune", dynamic_ncols=True)
    study.optimize(objective, n_trials=todo, callbacks=[lambda s, t: bar.update(1)])
    bar.close()
    if tuning.finished(study, pruned=False) == 0:
        idle = tuning.never_evicted(study)
        hint = (f"; {idle} never evicted in {args.proxy_tokens} tokens: raise --proxy-tokens" if idle else "")
        return _fail(f"no trial ran to the end ({tuning.finished(study)} pruned or invalid{hint}): "
                     "widen the search space or add trials")
    best = study.best_trial
    winner = dict(best.user_attrs["policy"], name=args.name)
    search_seconds = time.perf_counter() - started
    log(f"momentkv tune: best trial {best.number}, proxy KL {best.value:.4f}; confirming on {len(heldout)} "
        f"held-out prompts x {args.new_tokens} tokens")
    results, summary = tuning.confirm(model, winner, setup, heldout, held_encoded, args.new_tokens, suppressed,
                                      pad_id, args.batch_size, sampling, out / "store", args.baselines, args.seed,
                                      log=log)
    summary.update(trial=best.number, proxy_kl=best.value, trials=tuning.finished(study),
                   search_seconds=search_seconds, confirm_seconds=time.perf_counter() - started - search_seconds)
    command = typed_command(args)
    _write(out, winner, summary, study, results, command, dump_policy(load_policy(winner)))
    print(f"wrote {out}/best.yaml: held-out KL {_fmt(summary['kl_active'])}")
    return 0


def _fmt(est: dict, digits: int = 4, percent: bool = False) -> str:
    """An estimate with its interval; one without a value (no prompt with a step after an eviction, or no
    pair to compare) says so rather than print nan."""
    values = [est.get(k) for k in ("mean", "low", "high")]
    if any(v is None or not math.isfinite(v) for v in values):
        return "n/a (no step with eviction to average)"
    if percent:
        return f"{100 * values[0]:+.1f}% [{100 * values[1]:+.1f}, {100 * values[2]:+.1f}]"
    return f"{values[0]:.{digits}f} [{values[1]:.{digits}f}, {values[2]:.{digits}f}]"


def _stopped(study) -> str:
    from momentkv.tune.study import never_evicted

    idle = never_evicted(study)
    return f" {idle} trial(s) never evicted on the proxy prompts and were pruned." if idle else ""


def _write(out: Path, winner: dict, summary: dict, study, results, command: str, yaml_text: str) -> None:
    from momentkv.eval.report import markdown_table
    from momentkv.tune.study import summary_json, trials_table

    what = "total" if summary["memory"] == "total" else "decode"
    header = [f"# Found by momentkv tune (trial {summary['trial']} of {summary['trials']}): proxy KL "
              f"{summary['proxy_kl']:.4f} on the tune split.",
              f"# Held-out: {summary['prompts']} prompts x {summary['steps']} tokens at {what} budget "
              f"{summary['budget']}: KL (active steps) {_fmt(summary['kl_active'])}, 95% bootstrap interval.",
              f"# Equal peak memory: every policy holds at most {summary['budget']} tokens; this one evicts every "
              f"{summary['cadence']} step(s) down to decode.budget {summary['decode_budget']} "
              f"(= {summary['budget']} - {summary['cadence'] - 1})."]
    for name, other in summary["versus"].items():
        header.append(f"# Against {name}: KL {_fmt(other['kl_active'])}; paired KL ratio - 1: "
                      f"{_fmt(other['relative'], percent=True)}")
    if summary["memory"] == "total" and yaml_text.find("scope: all") < 0:
        header.append("# decode.budget holds the total budget: used alone, set it to the total minus the prompt length.")
    header.append(f"# Command: {command}")
    (out / "best.yaml").write_text("\n".join(header) + "\n" + yaml_text, encoding="utf-8")
    (out / "summary.json").write_text(summary_json(summary), encoding="utf-8")
    md = [f"# momentkv tune: {summary['policy']}", "", "Command:", "", f"    {command}", "",
          f"Search: {summary['trials']} finished trials in {summary['search_seconds']:.0f} s; the objective is the "
          "mean over the tune prompts of the KL to the full cache over all steps at the proxy length. Every "
          f"policy holds at most {summary['budget']} tokens: a cadence c evicts down to {summary['budget']} - (c - 1)."
          f"{_stopped(study)}", "",
          "## Best trials", "", trials_table(study), "",
          f"## Held-out confirmation ({summary['prompts']} prompts, {summary['steps']} tokens, "
          f"{summary['confirm_seconds']:.0f} s)", "", markdown_table(results, "all", "recency"), ""]
    (out / "tune.md").write_text("\n".join(md), encoding="utf-8")
