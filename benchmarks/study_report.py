"""Tables and plots of the fidelity study from ``study_run.py``'s raw data (no model needed).

    python benchmarks/study_report.py --raw benchmarks/fidelity --img docs/img > benchmarks/fidelity/report.md

Tuning reads the ``tune`` split only; the chosen variant is then reported on the ``heldout`` split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from momentkv.eval.aggregate import bootstrap, paired_difference, relative_difference  # noqa: E402
from momentkv.eval.configs import EvalConfig  # noqa: E402
from momentkv.eval.freerun import free_run_of  # noqa: E402
from momentkv.eval.prompts import PromptRecord  # noqa: E402
from momentkv.eval.replay import StepMetrics  # noqa: E402
from momentkv.eval.report import markdown_table, plot_kl_vs_budget, plot_kl_vs_step, prompt_values  # noqa: E402
from momentkv.eval.runner import ConfigResult, EvalResults  # noqa: E402
from momentkv.policy import load_policy  # noqa: E402

SEED = 0
STEP_PLOT = ("recency", "tova", "h2o", "scope", "ema0.9", "ema0.9-bc", "ema0.9-bc-r", "ema0.9-bc-r2", "ema0.9-bc+rec1",
             "ema0.95", "ema0.5")


def load_results(raw: Path, more: tuple[Path, ...] = ()) -> EvalResults:
    """``raw``'s results, plus the configs of runs in ``more`` that shared its reference (checked)."""
    meta = json.loads((raw / "study_meta.json").read_text())
    tf = torch.load(raw / "study_tf.pt")
    for extra in more:
        other = torch.load(extra / "study_tf.pt")
        if not torch.equal(other["reference_nll"], tf["reference_nll"]):
            raise SystemExit(f"{extra} was run against a different reference than {raw}")
        tf["configs"] += other["configs"]
    records = [PromptRecord(**p) for p in meta["prompts"]]
    out = EvalResults(records=records, steps=meta["steps"], seed=SEED, model_name="SmolLM2-135M-Instruct",
                      reference_nll=tf["reference_nll"].double(), meta=meta)
    for c in tf["configs"]:
        config = EvalConfig(label=c["label"], name=c["name"], budget=c["budget"], policy=load_policy(c["policy"]))
        metrics = StepMetrics(kl=c["kl"].double(), agree=c["agree"], nll=c["nll"].double(),
                              active_from=c["active_from"], kv_bytes=c["kv_bytes"], stored=c["stored"])
        out.results.append(ConfigResult(config=config, metrics=metrics, free=None, seconds=c["seconds"]))
    for folder in (raw, *more):
        attach_free_running(out, folder)
    return out


def attach_free_running(results: EvalResults, raw: Path) -> None:
    """Add ``study_free.pt``'s free-running runs to the teacher-forced results of the same label."""
    path = raw / "study_free.pt"
    if not path.exists():
        return
    free = torch.load(path)
    reference = free["reference_tokens"].long()
    by_label = {r.config.label: r for r in results.results}
    for c in free["configs"]:
        if c["label"] in by_label:
            by_label[c["label"]].free = free_run_of(c["tokens"].long(), reference)


def subset(results: EvalResults, keep) -> EvalResults:
    out = EvalResults(records=results.records, steps=results.steps, seed=results.seed,
                      model_name=results.model_name, reference_nll=results.reference_nll, meta=results.meta)
    out.results = [r for r in results.results if keep(r)]
    return out


def split_rows(results: EvalResults, split: str) -> np.ndarray:
    return np.array([i for i, r in enumerate(results.records) if r.split == split])


def find(results, name, budget):
    return next((r for r in results.results if r.config.name == name and r.config.budget == budget), None)


def tuning(results: EvalResults, budget: int) -> tuple[str, str]:
    """Rank the Moment-KV variants at ``budget`` by KL on the tune split; report the best on held-out."""
    tune, held = split_rows(results, "tune"), split_rows(results, "heldout")
    candidates = [r for r in results.results if r.config.budget == budget and r.config.name.startswith("ema")]
    ranked = sorted(candidates, key=lambda r: np.nanmean(prompt_values(r, "kl", "active")[tune]))
    lines = [f"### Tuning at B = {budget}: Moment-KV variants ranked on the tune split ({tune.size} prompts)", "",
             "| variant | KL active (tune) | top-1 active (tune) |", "| --- | --- | --- |"]
    for r in ranked:
        kl = bootstrap(prompt_values(r, "kl", "active")[tune], SEED)
        top = bootstrap(prompt_values(r, "top1", "active")[tune], SEED)
        lines.append(f"| {r.config.name} | {kl.fmt()} | {top.fmt()} |")
    best = ranked[0]
    lines += ["", f"### Held-out ({held.size} prompts) at B = {budget}: the tuned variant `{best.config.name}` "
              "against the baselines", "",
              "| policy | KL active | top-1 active | KL vs tuned (paired, relative) | KL − tuned (paired) |",
              "| --- | --- | --- | --- | --- |"]
    best_kl = prompt_values(best, "kl", "active")
    for name in (best.config.name, "recency", "h2o", "scope", "tova"):
        r = find(results, name, budget)
        if r is None:
            continue
        kl = prompt_values(r, "kl", "active")
        rel = relative_difference(kl[held], best_kl[held], SEED)
        diff = paired_difference(kl[held], best_kl[held], SEED)
        same = r is best
        lines.append(f"| {name} | {bootstrap(kl[held], SEED).fmt()} | "
                     f"{bootstrap(prompt_values(r, 'top1', 'active')[held], SEED).fmt()} | "
                     f"{'—' if same else f'{100 * rel.mean:+.1f}% [{100 * rel.low:+.1f}, {100 * rel.high:+.1f}]'} | "
                     f"{'—' if same else diff.fmt(4)} |")
    return best.config.name, "\n".join(lines)


def compact_table(results: EvalResults, budget: int) -> str:
    """One row per policy at ``budget``: KL (all, free, grounded), top-1, NLL, KL relative to recency and H2O."""
    kinds = np.array([r.kind for r in results.records])
    lines = [f"| policy | KL, all {kinds.size} prompts | KL, {(kinds == 'free').sum()} free | "
             f"KL, {(kinds == 'grounded').sum()} grounded | top-1 agreement | NLL of reference "
             "| KL vs recency | KL vs H2O |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def baseline(name):
        r = find(results, name, budget)
        return None if r is None else prompt_values(r, "kl", "active")

    rec, h2o = baseline("recency"), baseline("h2o")

    def rel(kl, base):
        if base is None:
            return "—"
        e = relative_difference(kl, base, SEED)
        return f"{100 * e.mean:+.0f}% [{100 * e.low:+.0f}, {100 * e.high:+.0f}]"

    for r in results.results:
        if r.config.budget != budget:
            continue
        kl = prompt_values(r, "kl", "active")
        cells = [r.config.name, bootstrap(kl, SEED).fmt(), bootstrap(kl[kinds == "free"], SEED).fmt(),
                 bootstrap(kl[kinds == "grounded"], SEED).fmt(),
                 bootstrap(prompt_values(r, "top1", "active"), SEED).fmt(),
                 bootstrap(prompt_values(r, "nll", "active"), SEED).fmt(2),
                 "—" if r.config.name == "recency" else rel(kl, rec), "—" if r.config.name == "h2o" else rel(kl, h2o)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def free_running_table(results: EvalResults) -> str:
    """Free-running greedy decoding: first step that differs from the full cache's output, share of equal tokens."""
    lines = ["| policy | budget | first divergent step | equal tokens | KL active (teacher-forced) |",
             "| --- | --- | --- | --- | --- |"]
    for r in results.results:
        if r.free is None:
            continue
        lines.append(f"| {r.config.name} | {r.config.budget} | "
                     f"{bootstrap(prompt_values(r, 'first_divergence', 'all'), SEED).fmt(1)} | "
                     f"{bootstrap(prompt_values(r, 'equal_tokens', 'all'), SEED).fmt()} | "
                     f"{bootstrap(prompt_values(r, 'kl', 'active'), SEED).fmt()} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", default="benchmarks/fidelity")
    parser.add_argument("--more-raw", nargs="*", default=[], help="runs that reused --raw's reference")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--img-prefix", default="", help="prefix of the plots' file names")
    parser.add_argument("--min-variants", type=int, default=8,
                        help="rank the Moment-KV variants of a budget when at least this many were measured")
    args = parser.parse_args()
    results = load_results(Path(args.raw), tuple(Path(p) for p in args.more_raw))
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    prefix = args.img_prefix
    print(f"{len(results.records)} prompts, {results.steps} generated tokens, device {results.meta.get('device')}\n")
    full = find(results, "full", None)
    if full is not None:
        print(f"Full-cache replay against the reference: KL exactly 0 at every step: "
              f"{bool((full.metrics.kl == 0).all())}; top-1 agreement 1.0: {bool(full.metrics.agree.all())}\n")
    if any(r.free is not None for r in results.results):
        print("## Free-running greedy decoding (95% bootstrap CI over prompts)\n")
        print(free_running_table(results) + "\n")
    budgets = sorted({r.config.budget for r in results.results if r.config.budget is not None})
    for budget in budgets:
        print(f"## B = {budget}: summary (steps with eviction; 95% bootstrap CI over prompts)\n")
        print(compact_table(results, budget) + "\n")
    for budget in budgets:
        at = subset(results, lambda r, b=budget: r.config.budget == b)
        for kind in ("all", "free", "grounded"):
            print(f"## B = {budget}, {kind} prompts\n")
            print(markdown_table(at, kind, baseline="recency"))
            print()
        for baseline in ("h2o",):
            if find(results, baseline, budget) is not None:
                print(f"KL relative to {baseline} at B = {budget} (all prompts): ")
                base = prompt_values(find(results, baseline, budget), "kl", "active")
                for r in at.results:
                    rel = relative_difference(prompt_values(r, "kl", "active"), base, SEED)
                    print(f"- {r.config.name}: {100 * rel.mean:+.1f}% [{100 * rel.low:+.1f}, {100 * rel.high:+.1f}]")
                print()
    for budget in budgets:
        if sum(r.config.name.startswith("ema") for r in results.results
               if r.config.budget == budget) >= args.min_variants:
            name, text = tuning(results, budget)
            print(text + "\n")
    both = {r.config.name for r in results.results if r.config.budget == budgets[0]} & \
        {r.config.name for r in results.results if r.config.budget == budgets[-1]}
    plot_kl_vs_budget(subset(results, lambda r: r.config.name in both), img / f"{prefix}kl_vs_budget.png")
    for budget in budgets:
        plot_kl_vs_step(subset(results, lambda r: r.config.name in STEP_PLOT), budget,
                        img / f"{prefix}kl_vs_step_B{budget}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
