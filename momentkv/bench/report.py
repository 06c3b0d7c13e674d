"""Tables, CSV and plots of benchmark summaries: every number next to its ratio against the full cache."""

from __future__ import annotations

import csv
from pathlib import Path

from momentkv.bench.runner import Summary

COLUMNS = ["policy", "new_tokens", "repeats", "tokens_per_s", "speed_vs_full", "kv_bytes", "kv_vs_full",
           "state_bytes", "peak_rss_growth", "attention_share", "momentkv_share", "update_share", "observe_share"]


def rows(summaries: list[Summary], reference: str = "full") -> list[dict]:
    """One dict per (policy, length) with medians and ratios against ``reference`` at the same length."""
    by_key = {(s.policy, s.new_tokens): s for s in summaries}
    out = []
    for s in summaries:
        ref = by_key.get((reference, s.new_tokens))
        seconds = s.median("seconds")
        row = {
            "policy": s.policy,
            "new_tokens": s.new_tokens,
            "repeats": len(s.runs),
            "tokens_per_s": s.median("tokens_per_s"),
            "kv_bytes": int(s.median("kv_bytes")),
            "state_bytes": int(s.median("state_bytes")),
            "peak_rss_growth": int(s.median("peak_rss_growth")),
            "attention_share": s.median("attention_s") / seconds,
            "update_share": s.median("update_s") / seconds,
            "observe_share": s.median("observe_s") / seconds,
        }
        row["momentkv_share"] = row["update_share"] + row["observe_share"]
        row["speed_vs_full"] = row["tokens_per_s"] / ref.median("tokens_per_s") if ref else float("nan")
        row["kv_vs_full"] = row["kv_bytes"] / ref.median("kv_bytes") if ref and ref.median("kv_bytes") else float("nan")
        out.append(row)
    return out


def markdown_table(table: list[dict]) -> str:
    head = ("| policy | new tokens | tokens/s | vs full | KV MiB | KV vs full | peak RSS +MiB | attention | "
            "momentkv (update + scoring) |")
    lines = [head, "|" + "---|" * 9]
    for r in table:
        lines.append(
            f"| {r['policy']} | {r['new_tokens']} | {r['tokens_per_s']:.2f} | {r['speed_vs_full']:.3f}x | "
            f"{r['kv_bytes'] / 2**20:.2f} | {r['kv_vs_full']:.3f} | {r['peak_rss_growth'] / 2**20:.1f} | "
            f"{r['attention_share']:.1%} | {r['momentkv_share']:.1%} ({r['update_share']:.1%} + "
            f"{r['observe_share']:.1%}) |"
        )
    return "\n".join(lines)


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
