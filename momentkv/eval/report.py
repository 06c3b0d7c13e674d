"""Reports of an evaluation: a Markdown table, a CSV (policy x budget x metric), PNG plots, raw per-step data.

Rows of the CSV: ``policy, budget, kind, metric, steps, mean, ci_low, ci_high, prompts`` where ``kind`` is
``all``, ``free`` or ``grounded``, and ``steps`` is ``active`` (from the first eviction on) or ``all``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from momentkv.eval.aggregate import Estimate, bootstrap, mean_curve, per_prompt_means, relative_difference
from momentkv.eval.runner import ConfigResult, EvalResults

KIND_GROUPS = ("all", "free", "grounded")
# (metric, what is averaged, steps)
METRICS = (("kl", "KL(full || policy), nats", "active"), ("top1", "top-1 agreement", "active"),
           ("nll", "reference-token NLL", "active"), ("kl", "KL(full || policy), nats", "all"),
           ("top1", "top-1 agreement", "all"), ("nll", "reference-token NLL", "all"))


def _rows_of_kind(results: EvalResults, kind: str) -> np.ndarray:
    if kind == "all":
        return np.arange(len(results.records))
    return np.array([i for i, r in enumerate(results.records) if r.kind == kind], dtype=np.int64)


def prompt_values(result: ConfigResult, metric: str, steps: str) -> np.ndarray:
    """Per-prompt means ``(P,)`` of ``metric`` (kl, top1, nll, first_divergence, equal_tokens)."""
    m = result.metrics
    if metric in ("first_divergence", "equal_tokens"):
        if result.free is None:
            return np.full(m.kl.shape[0], np.nan)
        v = result.free.first_divergence if metric == "first_divergence" else result.free.equal_fraction
        return v.double().numpy()
    values = {"kl": m.kl, "top1": m.agree, "nll": m.nll}[metric]
    return per_prompt_means(values, m.active_from if steps == "active" else None)


def estimates(results: EvalResults, rows: np.ndarray | None = None) -> list[dict]:
    """Every (config, kind, metric, steps) estimate as a dict (the CSV's rows); ``rows`` limits the prompts."""
    out = []
    for result in results.results:
        for kind in KIND_GROUPS:
            idx = _rows_of_kind(results, kind)
            if rows is not None:
                idx = np.intersect1d(idx, rows)
            if idx.size == 0:
                continue
            items = [(metric, steps) for metric, _, steps in METRICS]
            items += [("first_divergence", "all"), ("equal_tokens", "all")] if result.free is not None else []
            for metric, steps in items:
                est = bootstrap(prompt_values(result, metric, steps)[idx], results.seed)
                out.append({"policy": result.config.name, "label": result.config.label,
                            "budget": "" if result.config.budget is None else result.config.budget,
                            "kind": kind, "metric": metric, "steps": steps, "mean": est.mean,
                            "ci_low": est.low, "ci_high": est.high, "prompts": est.n})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["policy", "label", "budget", "kind", "metric", "steps", "mean", "ci_low", "ci_high", "prompts"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})


def _baseline(results: EvalResults, result: ConfigResult, baseline: str) -> ConfigResult | None:
    for other in results.results:
        if other.config.name == baseline and other.config.budget == result.config.budget:
            return other
    return None


def markdown_table(results: EvalResults, kind: str = "all", baseline: str = "recency",
                   rows: np.ndarray | None = None) -> str:
    """One row per config: means with 95% bootstrap intervals over prompts."""
    idx = _rows_of_kind(results, kind)
    if rows is not None:
        idx = np.intersect1d(idx, rows)
    seed = results.seed
    head = ("| policy | budget | KL active | top-1 active | NLL active | KL all | top-1 all | "
            f"KL vs {baseline} (active) | first divergence | equal tokens | s |")
    lines = [head, "|" + " --- |" * 11]
    for result in results.results:
        cells = [result.config.name, "—" if result.config.budget is None else str(result.config.budget)]
        for metric, _, steps in METRICS:
            if (metric, steps) in (("nll", "all"),):
                continue
            cells.append(bootstrap(prompt_values(result, metric, steps)[idx], seed).fmt())
        base = _baseline(results, result, baseline)
        if base is None or base is result:
            cells.append("—")
        else:
            rel = relative_difference(prompt_values(result, "kl", "active")[idx],
                                      prompt_values(base, "kl", "active")[idx], seed)
            cells.append("—" if np.isnan(rel.mean) else
                         f"{100 * rel.mean:+.1f}% [{100 * rel.low:+.1f}, {100 * rel.high:+.1f}]")
        for metric in ("first_divergence", "equal_tokens"):
            est = bootstrap(prompt_values(result, metric, "all")[idx], seed)
            cells.append(est.fmt(1 if metric == "first_divergence" else 3))
        cells.append(f"{result.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: EvalResults, command: str = "", baseline: str = "recency") -> str:
    parts = [f"# momentkv eval: {results.model_name}", ""]
    if command:
        parts += ["Command:", "", f"    {command}", ""]
    kinds = {k: sum(r.kind == k for r in results.records) for k in ("free", "grounded")}
    parts += [f"{len(results.records)} prompts ({kinds['free']} free, {kinds['grounded']} grounded), "
              f"{results.steps} generated tokens each, seed {results.seed}. Means over prompts with 95% "
              "bootstrap intervals; 'active' averages the steps from the first eviction on, 'all' every step. "
              "KL in nats; top-1: the policy's argmax equals the full cache's; first divergence and equal tokens "
              "from free-running greedy decoding.", ""]
    for kind in KIND_GROUPS:
        if kind != "all" and not kinds.get(kind):
            continue
        parts += [f"## {kind} prompts", "", markdown_table(results, kind, baseline), ""]
    return "\n".join(parts)


def plot_kl_vs_budget(results: EvalResults, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, kind in zip(axes, KIND_GROUPS):
        idx = _rows_of_kind(results, kind)
        names = sorted({r.config.name for r in results.results if r.config.budget is not None})
        for name in names:
            pts = sorted((r.config.budget, bootstrap(prompt_values(r, "kl", "active")[idx], results.seed))
                         for r in results.results if r.config.name == name and r.config.budget is not None)
            pts = [(b, e) for b, e in pts if not np.isnan(e.mean)]
            if not pts:
                continue
            xs = [b for b, _ in pts]
            ys = np.array([e.mean for _, e in pts])
            err = np.array([[e.mean - e.low for _, e in pts], [e.high - e.mean for _, e in pts]])
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode budget (tokens)")
        ax.set_title(f"{kind} prompts (n={idx.size})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("KL(full || policy), steps with eviction")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{results.model_name}: KL vs budget, {results.steps} tokens, 95% bootstrap CI over prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_vs_step(results: EvalResults, budget: int, path: Path, smooth: int = 16) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in results.results if r.config.budget == budget]
    if not chosen:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kernel = np.ones(smooth) / smooth
    for result in chosen:
        curve = mean_curve(result.metrics.kl)
        if not (curve > 0).any():
            continue  # nothing evicted: KL is 0 at every step, off a log axis
        smoothed = np.convolve(curve, kernel, mode="valid") if curve.size >= smooth else curve
        ax.plot(np.arange(smoothed.size) + (curve.size - smoothed.size), smoothed, label=result.config.name, lw=1.2)
    ax.axvline(budget, color="grey", ls=":", lw=1)
    if ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("generation step")
    ax.set_ylabel(f"KL(full || policy), mean over prompts ({smooth}-step moving average)")
    ax.set_title(f"{results.model_name}: KL vs step at budget {budget}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_raw(results: EvalResults, path: Path) -> None:
    """Per-step metrics of every config (float32/bool), for later analysis or merging."""
    torch.save({
        "model": results.model_name, "steps": results.steps, "seed": results.seed, "meta": results.meta,
        "prompts": [r.__dict__ for r in results.records],
        "reference_tokens": results.reference_tokens, "reference_nll": results.reference_nll.float(),
        "configs": [{
            "label": r.config.label, "name": r.config.name, "budget": r.config.budget,
            "policy": r.config.policy.model_dump(mode="json"), "seconds": r.seconds,
            "kl": r.metrics.kl.float(), "agree": r.metrics.agree, "nll": r.metrics.nll.float(),
            "active_from": r.metrics.active_from, "kv_bytes": r.metrics.kv_bytes, "stored": r.metrics.stored,
            "free_tokens": None if r.free is None else r.free.tokens,
        } for r in results.results],
    }, path)


def write_outputs(results: EvalResults, out_dir: Path, command: str = "", baseline: str = "recency") -> list[Path]:
    """Write every output into ``out_dir`` (which must exist); return the paths written."""
    out_dir = Path(out_dir)
    written = []
    md = out_dir / "results.md"
    md.write_text(markdown_report(results, command, baseline), encoding="utf-8")
    csv_path = out_dir / "results.csv"
    write_csv(estimates(results), csv_path)
    written += [md, csv_path]
    if any(r.config.budget is not None for r in results.results):
        plot = out_dir / "kl_vs_budget.png"
        plot_kl_vs_budget(results, plot)
        written.append(plot)
    for budget in sorted({r.config.budget for r in results.results if r.config.budget is not None}):
        plot = out_dir / f"kl_vs_step_B{budget}.png"
        if plot_kl_vs_step(results, budget, plot):
            written.append(plot)
    raw = out_dir / "raw.pt"
    save_raw(results, raw)
    written.append(raw)
    return written
