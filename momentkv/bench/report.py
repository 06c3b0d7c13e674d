"""Tables, CSV and plots of benchmark summaries: every number next to its ratio against a named reference.

The reference of the speed and memory ratios is a run of the same benchmark, named in every table header and
CSV row (``vs full``, ``vs unpatched``, ``vs moment``...). Operation counts are set against the unpatched model.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from momentkv.bench.runner import UNPATCHED, Summary

FULL = "full"
NAN = math.nan

COLUMNS = ["policy", "new_tokens", "repeats", "reference", "tokens_per_s", "speed_vs_reference", "kv_bytes",
           "kv_vs_reference", "state_bytes", "peak_rss_growth", "attention_share", "momentkv_share", "update_share",
           "observe_share", "layers", "ops_per_step", "unpatched_ops_per_step", "ops_added_per_layer",
           "update_ops_per_layer", "attention_ops_per_layer", "observe_ops_per_layer", "model_ops_per_layer",
           "compile_s", "compile_wall_s", "graphs"]


def pick_reference(names: list[str]) -> str:
    """The full cache if it was run, else the unpatched model, else the first entry."""
    for preferred in (FULL, UNPATCHED):
        if preferred in names:
            return preferred
    return names[0]


def _ratio(value: float, reference: float | None) -> float:
    return value / reference if reference else NAN


def _op_columns(s: Summary, unpatched: Summary | None) -> dict:
    """Operations per decode step (all layers) and per layer by region, and the count added per layer."""
    ops, layers = s.ops or {}, s.layers or 0
    base = unpatched.ops.get("total", NAN) if unpatched is not None and unpatched.ops else NAN

    def per_layer(region: str) -> float:
        return ops.get(region, NAN) / layers if layers else NAN

    own = s.policy != UNPATCHED  # the unpatched model's attention reports to no layer: not told apart
    return {
        "layers": layers,
        "ops_per_step": ops.get("total", NAN),
        "unpatched_ops_per_step": base,
        "ops_added_per_layer": (ops.get("total", NAN) - base) / layers if layers else NAN,
        "update_ops_per_layer": per_layer("update"),
        "attention_ops_per_layer": per_layer("attention") if own else NAN,
        "observe_ops_per_layer": per_layer("observe") if own else NAN,
        "model_ops_per_layer": per_layer("model") if own else NAN,
    }


def rows(summaries: list[Summary], reference: str) -> list[dict]:
    """One dict per timed (policy, length): medians, ratios against ``reference`` at the same length, and the
    operation counts of the counting runs against the unpatched model's."""
    by_key = {(s.policy, s.new_tokens): s for s in summaries}
    out = []
    for s in summaries:
        if not s.runs:  # counted only (the unpatched reference of the operation counts)
            continue
        ref = by_key.get((reference, s.new_tokens))
        ref = ref if ref is not None and ref.runs else None
        seconds = s.median("seconds")
        row = {
            "policy": s.policy,
            "new_tokens": s.new_tokens,
            "repeats": len(s.runs),
            "reference": reference,
            "tokens_per_s": s.median("tokens_per_s"),
            "kv_bytes": int(s.median("kv_bytes")),
            "state_bytes": int(s.median("state_bytes")),
            "peak_rss_growth": int(s.median("peak_rss_growth")),
            "attention_share": s.median("attention_s") / seconds,
            "update_share": s.median("update_s") / seconds,
            "observe_share": s.median("observe_s") / seconds,
        }
        row["momentkv_share"] = row["update_share"] + row["observe_share"]
        row["speed_vs_reference"] = _ratio(row["tokens_per_s"], ref and ref.median("tokens_per_s"))
        row["kv_vs_reference"] = _ratio(row["kv_bytes"], ref and ref.median("kv_bytes"))
        row.update(_op_columns(s, by_key.get((UNPATCHED, s.new_tokens))))
        report = s.compile
        row["compile_s"] = NAN if report is None else report.seconds
        row["compile_wall_s"] = NAN if report is None else report.wall
        row["graphs"] = NAN if report is None else report.graphs
        out.append(row)
    return out


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1%}"


def _num(x: float, digits: int = 1) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(table: list[dict]) -> str:
    """The table ``momentkv bench`` prints; the ratio columns name their reference."""
    ref = table[0]["reference"] if table else FULL
    head = (f"| policy | new tokens | tokens/s | vs {ref} | KV MiB | KV vs {ref} | peak RSS +MiB | attention | "
            "momentkv (update + scoring) | ops/step | ops/layer added vs unpatched | "
            "ops/layer: update + attention + observe |")
    lines = [head, "|" + "---|" * 12]
    for r in table:
        split = "—" if r["policy"] == UNPATCHED else (
            f"{_num(r['update_ops_per_layer'])} + {_num(r['attention_ops_per_layer'])} + "
            f"{_num(r['observe_ops_per_layer'])}")
        lines.append(
            f"| {r['policy']} | {r['new_tokens']} | {r['tokens_per_s']:.2f} | {_num(r['speed_vs_reference'], 3)}x | "
            f"{r['kv_bytes'] / 2**20:.2f} | {_num(r['kv_vs_reference'], 3)} | {r['peak_rss_growth'] / 2**20:.1f} | "
            f"{_pct(r['attention_share'])} | {_pct(r['momentkv_share'])} ({_pct(r['update_share'])} + "
            f"{_pct(r['observe_share'])}) | {_num(r['ops_per_step'], 0)} | {_num(r['ops_added_per_layer'])} | "
            f"{split} |"
        )
    lines += ["", _legend(table, ref)]
    compiled = {r["policy"]: r for r in table if not math.isnan(r["compile_s"])}
    if compiled:
        lines += ["", "Compiled entries (`+compiled`): the prompt and the growing cache run eagerly, the steps after the "
                  "budget is full compiled; their compilation, in one untimed warm-up before the timed runs, is not in "
                  "tokens/s: " + "; ".join(
                      f"{name}: {r['compile_s']:.1f} s in the steps that compiled ({r['compile_wall_s']:.1f} s warm-up "
                      f"generation), {r['graphs']:.0f} graphs compiled in the process" for name, r in compiled.items())
                  + ". Their time split and operations are not measured (the steps run inside compiled code)."]
    return "\n".join(lines)


def _legend(table: list[dict], ref: str) -> str:
    base = {r["new_tokens"]: r["unpatched_ops_per_step"] for r in table if not math.isnan(r["unpatched_ops_per_step"])}
    ops = ("ops: aten operations per decode step inside the model's forward, mean over the decode steps of "
           "one untimed run; per layer by region")
    if base:
        ops += "; the unpatched model: " + ", ".join(f"{v:.0f} at {n} tokens" for n, v in sorted(base.items()))
    else:
        ops += " (not counted: --no-op-counts)"
    return (f"Ratios against {ref} at the same length. Time shares: of the wall time of generate, summed over "
            f"layers. {ops}.")


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in table)


def plot(table: list[dict], path: Path, title: str) -> None:
    """Tokens/s and stored KV bytes against generation length, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in table):
        points = sorted((r for r in table if r["policy"] == policy), key=lambda r: r["new_tokens"])
        xs = [r["new_tokens"] for r in points]
        speed.plot(xs, [r["tokens_per_s"] for r in points], marker="o", label=policy)
        memory.plot(xs, [r["kv_bytes"] / 2**20 for r in points], marker="o", label=policy)
    speed.set(xlabel="generated tokens", ylabel="tokens/s (median)", title="speed")
    memory.set(xlabel="generated tokens", ylabel="stored KV (MiB)", title="KV cache at the end")
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    speed.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
