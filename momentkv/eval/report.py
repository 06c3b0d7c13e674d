"""Reports of an evaluation: a Markdown table, a CSV (policy x budget x metric), PNG plots, raw per-step data.

Rows of the CSV: ``policy, budget, memory, kind, metric, steps, mean, ci_low, ci_high, prompts`` where
``memory`` says what the budget counts (``decode``: generated tokens; ``total``: prompt + generated), ``kind``
is ``all``, ``free`` or ``grounded``, and ``steps`` is ``active`` (from the first eviction on) or ``all``.
``prompts.csv`` has one row per prompt: its kind, split, length, the repetition of its reference and each
config's KL.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from momentkv.eval.aggregate import bootstrap, mean_curve, per_prompt_means, relative_difference
from momentkv.eval.repetition import REPETITION_N
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
                            "memory": result.config.memory, "kind": kind, "metric": metric, "steps": steps, "mean": est.mean,
                            "ci_low": est.low, "ci_high": est.high, "prompts": est.n})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["policy", "label", "budget", "memory", "kind", "metric", "steps", "mean", "ci_low", "ci_high",
              "prompts"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})


def _baseline(results: EvalResults, result: ConfigResult, baseline: str) -> ConfigResult | None:
    for other in results.results:
        if (other.config.name == baseline and other.config.budget == result.config.budget
                and other.config.memory == result.config.memory):
            return other
    return None


def budget_text(result: ConfigResult) -> str:
    """``64`` for a decode budget, ``T 512`` for a total one, ``—`` for none."""
    if result.config.budget is None:
        return "—"
    return f"T {result.config.budget}" if result.config.memory == "total" else str(result.config.budget)


def slots_text(result: ConfigResult, idx: np.ndarray) -> str:
    """Mean KV slots per layer after the last step over the prompts ``idx`` (generated ones in brackets)."""
    m = result.metrics
    if m.slots is None or idx.size == 0:
        return "—"
    if m.generated_slots is None:  # a peer toolkit's pass: slots only
        return f"{float(m.slots[idx].mean()):.0f}"
    return f"{float(m.slots[idx].mean()):.0f} ({float(m.generated_slots[idx].mean()):.0f})"


def markdown_table(results: EvalResults, kind: str = "all", baseline: str = "recency",
                   rows: np.ndarray | None = None) -> str:
    """One row per config: means with 95% bootstrap intervals over prompts."""
    idx = _rows_of_kind(results, kind)
    if rows is not None:
        idx = np.intersect1d(idx, rows)
    seed = results.seed
    head = ("| policy | budget | KL active | top-1 active | NLL active | KL all | top-1 all | "
            f"KL vs {baseline} (active) | first divergence | equal tokens | KV slots (generated) | s |")
    lines = [head, "|" + " --- |" * 12]
    for result in results.results:
        cells = [result.config.name, budget_text(result)]
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
        cells.append(slots_text(result, idx))
        cells.append(f"{result.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repetition_summary(results: EvalResults, kind: str = "all") -> str:
    """Mean rep-n of the references of ``kind`` with its bootstrap interval, e.g. ``0.21 [0.15, 0.28]``."""
    if results.reference_repetition is None:
        return "—"
    idx = _rows_of_kind(results, kind)
    return bootstrap(results.reference_repetition.numpy()[idx], results.seed).fmt(2)


def prompt_table(results: EvalResults) -> str:
    """One row per prompt: kind, split, length, its reference's repetition, and each config's KL (active)."""
    n = results.meta.get("repetition_n", REPETITION_N)
    labels = [r.config.label for r in results.results if r.config.budget is not None]
    lines = [f"| prompt | kind | split | prompt tokens | rep-{n} | " + " | ".join(labels) + " |",
             "|" + " --- |" * (5 + len(labels))]
    kl = {r.config.label: prompt_values(r, "kl", "active") for r in results.results}
    for i, record in enumerate(results.records):
        rep = "—" if results.reference_repetition is None else f"{float(results.reference_repetition[i]):.2f}"
        length = "—" if results.prompt_lengths is None else str(results.prompt_lengths[i])
        cells = [record.id, record.kind, record.split, length, rep]
        cells += ["—" if np.isnan(kl[label][i]) else f"{kl[label][i]:.3f}" for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_prompt_csv(results: EvalResults, path: Path) -> None:
    labels = [r.config.label for r in results.results]
    kl = {r.config.label: prompt_values(r, "kl", "active") for r in results.results}
    n = results.meta.get("repetition_n", REPETITION_N)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "kind", "split", "prompt_tokens", f"reference_rep{n}"] + [f"kl_active:{x}" for x in labels])
        for i, record in enumerate(results.records):
            rep = "" if results.reference_repetition is None else f"{float(results.reference_repetition[i]):.6g}"
            length = "" if results.prompt_lengths is None else results.prompt_lengths[i]
            writer.writerow([record.id, record.kind, record.split, length, rep] + [f"{kl[x][i]:.6g}" for x in labels])


def markdown_report(results: EvalResults, command: str = "", baseline: str = "recency") -> str:
    parts = [f"# momentkv eval: {results.model_name}", ""]
    if command:
        parts += ["Command:", "", f"    {command}", ""]
    kinds = {k: sum(r.kind == k for r in results.records) for k in ("free", "grounded")}
    how = results.meta.get("reference", "greedy")
    n = results.meta.get("repetition_n", REPETITION_N)
    parts += [f"{len(results.records)} prompts ({kinds['free']} free, {kinds['grounded']} grounded), "
              f"{results.steps} generated tokens each, reference {how}, seed {results.seed}. Means over prompts "
              "with 95% bootstrap intervals; 'active' averages the steps from the first eviction on, 'all' every "
              "step. KL in nats; top-1: the policy's argmax equals the full cache's; first divergence and "
              "equal tokens from free-running decoding (tokens chosen as the reference's were). Budget: decode "
              "tokens, or 'T n' for n KV tokens in all (prompt + generated). KV slots: per layer and KV head after "
              "the last step, mean over layers and prompts, checked against each policy's budget.", "",
              f"Repetition of the references (rep-{n}, the share of {n}-grams that occurred earlier in the same "
              f"text; 0 never repeats, near 1 loops): all {repetition_summary(results)}, free "
              f"{repetition_summary(results, 'free')}, grounded {repetition_summary(results, 'grounded')}.", ""]
    for kind in KIND_GROUPS:
        if kind != "all" and not kinds.get(kind):
            continue
        parts += [f"## {kind} prompts", "", markdown_table(results, kind, baseline), ""]
    parts += ["## Per prompt: the reference's repetition beside each config's KL (active steps)", "",
              prompt_table(results), ""]
    return "\n".join(parts)


def _budgeted(results: EvalResults, memory: str) -> list[ConfigResult]:
    return [r for r in results.results if r.config.budget is not None and r.config.memory == memory]


def _style(i: int) -> dict:
    """Colour and marker of the ``i``-th series: 20 colours and 10 markers, so a dozen policies stay apart."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"].colors[i % 20], "marker": "osD^vP*Xh<"[i % 10]}


def _legend(ax, axes=None, **kwargs) -> None:
    """A legend on ``ax`` of the labelled series of ``axes`` (default: ``ax``), each label once; none when
    nothing is labelled (a plot where no policy evicted), which matplotlib would otherwise warn about."""
    entries: dict[str, object] = {}
    for each in axes if axes is not None else [ax]:
        for handle, label in zip(*each.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        ax.legend(list(entries.values()), list(entries), **kwargs)


def plot_kl_vs_budget(results: EvalResults, path: Path, memory: str = "decode") -> None:
    """KL against budget per policy, one panel per prompt kind; ``memory``: decode or total budgets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = _budgeted(results, memory)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, kind in zip(axes, KIND_GROUPS):
        idx = _rows_of_kind(results, kind)
        names = sorted({r.config.name for r in chosen})
        for i, name in enumerate(names):
            pts = sorted(((r.config.budget, bootstrap(prompt_values(r, "kl", "active")[idx], results.seed))
                          for r in chosen if r.config.name == name), key=lambda x: x[0])
            pts = [(b, e) for b, e in pts if not np.isnan(e.mean)]
            if not pts:
                continue
            xs = [b for b, _ in pts]
            ys = np.array([e.mean for _, e in pts])
            err = np.array([[e.mean - e.low for _, e in pts], [e.high - e.mean for _, e in pts]])
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=name, **_style(i))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode budget (tokens)" if memory == "decode" else "total budget: prompt + generated tokens")
        ax.set_title(f"{kind} prompts (n={idx.size})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("KL(full || policy), steps with eviction")
    _legend(axes[-1], axes, fontsize=7, loc="best")
    fig.suptitle(f"{results.model_name}: KL vs budget, {results.steps} tokens, 95% bootstrap CI over prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_vs_step(results: EvalResults, budget: int, path: Path, smooth: int = 16, memory: str = "decode") -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in _budgeted(results, memory) if r.config.budget == budget]
    if not chosen:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kernel = np.ones(smooth) / smooth
    for i, result in enumerate(chosen):
        curve = mean_curve(result.metrics.kl)
        if not (curve > 0).any():
            continue  # nothing evicted: KL is 0 at every step, off a log axis
        smoothed = np.convolve(curve, kernel, mode="valid") if curve.size >= smooth else curve
        ax.plot(np.arange(smoothed.size) + (curve.size - smoothed.size), smoothed, label=result.config.name, lw=1.2,
                color=_style(i)["color"], ls="-" if i % 2 == 0 else "--")
    if memory == "decode":
        ax.axvline(budget, color="grey", ls=":", lw=1)
    if ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("generation step")
    ax.set_ylabel(f"KL(full || policy), mean over prompts ({smooth}-step moving average)")
    what = "budget" if memory == "decode" else "total budget"
    ax.set_title(f"{results.model_name}: KL vs step at {what} {budget}")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, fontsize=7, ncol=2)
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
        "reference_repetition": results.reference_repetition, "prompt_lengths": results.prompt_lengths,
        "configs": [{
            "label": r.config.label, "name": r.config.name, "budget": r.config.budget, "memory": r.config.memory,
            "policy": None if r.config.policy is None else r.config.policy.model_dump(mode="json"),
            "seconds": r.seconds, "slots": r.metrics.slots,
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
    prompt_csv = out_dir / "prompts.csv"
    write_prompt_csv(results, prompt_csv)
    written += [md, csv_path, prompt_csv]
    for memory, name, prefix in (("decode", "kl_vs_budget.png", "B"), ("total", "kl_vs_total.png", "T")):
        chosen = _budgeted(results, memory)
        if not chosen:
            continue
        plot = out_dir / name
        plot_kl_vs_budget(results, plot, memory)
        written.append(plot)
        for budget in sorted({r.config.budget for r in chosen}):
            plot = out_dir / f"kl_vs_step_{prefix}{budget}.png"
            if plot_kl_vs_step(results, budget, plot, memory=memory):
                written.append(plot)
    raw = out_dir / "raw.pt"
    save_raw(results, raw)
    written.append(raw)
    return written


def read_bench(path: Path) -> dict[str, float]:
    """``policy -> tokens/s`` from a ``momentkv bench`` CSV (the first row of each policy)."""
    speeds: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            speeds.setdefault(row["policy"], float(row["tokens_per_s"]))
    return speeds


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points ``(name, speed, kl)`` that no other point beats on both (faster and lower KL)."""
    front = []
    for name, speed, kl in points:
        dominated = any(s >= speed and k <= kl and (s > speed or k < kl) for _, s, k in points)
        if not dominated:
            front.append(name)
    return front


def plot_fidelity_vs_speed(results: EvalResults, speeds: dict[str, float], budget: int, path: Path) -> list[str]:
    """KL (active steps, 95% CI) against tokens/s for the configs at decode ``budget`` that ``speeds`` times;
    the Pareto front is drawn as a line. Returns the names on the front (empty: nothing to plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for r in _budgeted(results, "decode"):
        if r.config.budget == budget and r.config.name in speeds:
            est = bootstrap(prompt_values(r, "kl", "active"), results.seed)
            if not np.isnan(est.mean):
                points.append((r.config.name, speeds[r.config.name], est))
    if not points:
        return []
    front = pareto_front([(n, s, e.mean) for n, s, e in points])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, speed, est in points:
        ax.errorbar([speed], [est.mean], yerr=[[est.mean - est.low], [est.high - est.mean]], marker="o", capsize=3,
                    label=name)
    line = sorted((s, e.mean) for n, s, e in points if n in front)
    ax.plot([x for x, _ in line], [y for _, y in line], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("tokens/s (momentkv bench)")
    ax.set_ylabel("KL(full || policy), steps with eviction")
    ax.set_title(f"{results.model_name}: fidelity against speed at decode budget {budget}")
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return front
