"""The fidelity benchmark's table: vLLM against momentkv's transformers path, and both against their full cache.

    python benchmarks/vllm/fidelity_compare.py OUT RESULTS.md RAW.json

OUT holds what ``benchmarks/vllm/fidelity.sh`` ran: prompts.json, request.json, transformers.json
(``fidelity_reference.py``), vllm.json (``tests/vllm/run_vllm.py``) and times.txt. Per policy (``full`` is the
full cache):

1. vLLM against the transformers path with the same policy, per prompt: all tokens equal, or the first step
   where they differ and, there, both candidates' log-probabilities in each path's distribution (their gap
   says whether it was a near-tie); the largest |difference| of the chosen tokens' log-probabilities over the
   steps before the first difference (the common prefix).
2. Each path against its own full cache (transformers policy against transformers full, vLLM policy against
   vLLM full): the steps before the first token that differs (per prompt and the mean) and the share of the
   tokens equal at the same position.

Standard library only. RAW.json keeps the prompts' ids and lengths, per path, policy and prompt the tokens and
the chosen tokens' log-probabilities (rounded to 1e-6), and the comparison's numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

POLICIES = ("full", "moment", "recency")
NEAR_TIE = 0.05  # a gap (nats) below which the two candidates count as a near-tie


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where ``a`` and ``b`` differ (over their common length), None when they never do."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def vllm_outputs(run: dict) -> list[dict]:
    """vLLM's steps ([[token, logprob], ...]: the chosen token's and the top ones) as tokens, chosen and top."""
    outputs = []
    for out in run["outputs"]:
        chosen = []
        for token, step in zip(out["tokens"], out["logprobs"]):
            table = dict((t, v) for t, v in step)
            chosen.append(table[token])
        outputs.append({"tokens": out["tokens"], "chosen_logprobs": chosen,
                        "top": [[[t, v] for t, v in step] for step in out["logprobs"]]})
    return outputs


def lookup(step: list, token: int) -> float | None:
    for t, v in step:
        if t == token:
            return v
    return None


def fmt(value: float | None, digits: int = 3) -> str:
    return "below top 5" if value is None else f"{value:.{digits}f}"


def compare_paths(tf: list[dict], vl: list[dict], ids: list[str]) -> dict:
    rows = []
    for pid, a, b in zip(ids, tf, vl):
        step = first_difference(a["tokens"], b["tokens"])
        prefix = len(a["tokens"]) if step is None else step
        diffs = [abs(x - y) for x, y in zip(a["chosen_logprobs"][:prefix], b["chosen_logprobs"][:prefix])]
        row = {"prompt": pid, "equal": step is None, "first_difference": step,
               "max_abs_logprob_diff": max(diffs) if diffs else 0.0}
        if step is not None and step < min(len(a["tokens"]), len(b["tokens"])):
            ta, tb = a["tokens"][step], b["tokens"][step]
            row["tokens"] = {"transformers": ta, "vllm": tb}
            row["transformers_logprobs"] = [lookup(a["top"][step], ta), lookup(a["top"][step], tb)]
            row["vllm_logprobs"] = [lookup(b["top"][step], ta), lookup(b["top"][step], tb)]
        rows.append(row)
    return {"prompts": rows, "all_equal": sum(r["equal"] for r in rows),
            "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows)}


def compare_full(policy: list[dict], full: list[dict], ids: list[str]) -> dict:
    rows = []
    for pid, p, f in zip(ids, policy, full):
        step = first_difference(p["tokens"], f["tokens"])
        n = min(len(p["tokens"]), len(f["tokens"]))
        rows.append({"prompt": pid, "steps_before_difference": n if step is None else step,
                     "share_equal": sum(x == y for x, y in zip(p["tokens"], f["tokens"])) / n})
    count = len(rows)
    return {"prompts": rows, "mean_steps": sum(r["steps_before_difference"] for r in rows) / count,
            "mean_share": sum(r["share_equal"] for r in rows) / count}


def times(folder: Path) -> dict:
    result = {}
    path = folder / "times.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, run, waited = line.split()
            result[name] = {"seconds": int(run), "waited": int(waited)}
    return result


def main() -> None:
    folder, results_path, raw_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    prompts = json.loads((folder / "prompts.json").read_text())
    request = json.loads((folder / "request.json").read_text())
    tf = json.loads((folder / "transformers.json").read_text())
    vl = json.loads((folder / "vllm.json").read_text())
    ids = prompts["prompt_ids"]
    if tf["prompts"] != prompts["prompts"] or request["prompts"] != prompts["prompts"]:
        sys.exit("the transformers run, the vLLM request and prompts.json hold different prompts")
    for name in POLICIES:
        run = vl["runs"].get(name, {})
        if "error" in run or "outputs" not in run:
            sys.exit(f"vLLM run {name} failed: {run.get('error')}: {run.get('message')}")
        if len(tf["cases"].get(name, {}).get("outputs", [])) != len(ids):
            sys.exit(f"the transformers run has not finished {name}")
    paths = {"transformers": {name: tf["cases"][name]["outputs"] for name in POLICIES},
             "vllm": {name: vllm_outputs(vl["runs"][name]) for name in POLICIES}}
    for path, outputs in paths.items():
        for name in POLICIES[1:]:
            if all(p["tokens"] == f["tokens"] and p["chosen_logprobs"] == f["chosen_logprobs"]
                   for p, f in zip(outputs[name], outputs["full"])):
                sys.exit(f"{path} {name}: tokens and log-probabilities bit-identical to the full cache's on every "
                         "prompt: the policy was not applied (for vLLM: was momentkv's plugin loaded in the main "
                         "process? see fidelity_request.py)")
    same = {name: compare_paths(paths["transformers"][name], paths["vllm"][name], ids) for name in POLICIES}
    to_full = {path: {name: compare_full(paths[path][name], paths[path]["full"], ids) for name in POLICIES[1:]}
               for path in paths}
    wall = times(folder)
    new_tokens, budget = tf["new_tokens"], tf["budget"]

    lines = [
        "# Fidelity of the vLLM path on held-out prompts",
        "",
        f"SmolLM2-135M-Instruct (float32), the first {len(ids)} held-out prompts of momentkv's prompt set "
        f"(chat-templated; {', '.join(f'{i} {len(p)}' for i, p in zip(ids, prompts['prompts']))} prompt tokens), "
        f"{new_tokens} greedy tokens each, EOS ignored; `moment.yaml` and `recency.yaml` at budget {budget}. "
        f"transformers: momentkv's path (`.venv`, SDPA, `momentkv.patch`, one prompt at a time, "
        f"`benchmarks/vllm/fidelity_reference.py`); vLLM {vl['vllm']} (`.venv-vllm`, `tests/vllm/run_vllm.py`, "
        f"enforce_eager, the {len(ids)} requests batched, logprobs 5; the full cache is plain vLLM, "
        "`VLLM_PLUGINS=none`).",
        "",
        "## vLLM against the transformers path, same policy",
        "",
        f"Log-probabilities at the first differing step: (transformers' token, vLLM's token) in each path's "
        f"distribution; a gap under {NEAR_TIE} nats is called a near-tie. Largest |Δ log-prob|: the chosen tokens' "
        "over the steps before the first difference (all steps where the tokens are equal).",
        "",
        "| policy | prompts with all tokens equal | first differences (prompt: step, transformers' lp (tf tok, vLLM tok); "
        "vLLM's lp (tf tok, vLLM tok)) | largest \\|Δ log-prob\\| over the common prefix |",
        "|---|---|---|---|",
    ]
    for name in POLICIES:
        notes = []
        for row in same[name]["prompts"]:
            if row["equal"]:
                continue
            if "tokens" not in row:
                notes.append(f"{row['prompt']}: lengths differ at {row['first_difference']}")
                continue
            ta, tb = row["transformers_logprobs"]
            va, vb = row["vllm_logprobs"]
            gap = None if ta is None or tb is None else ta - tb
            kind = "" if gap is None else (" near-tie" if gap < NEAR_TIE else " **not a near-tie**")
            notes.append(f"{row['prompt']}: step {row['first_difference']}, tf ({fmt(ta)}, {fmt(tb)}); "
                         f"vLLM ({fmt(va)}, {fmt(vb)}); gap {fmt(gap, 4)}{kind}")
        lines.append(f"| {name} | {same[name]['all_equal']}/{len(ids)} | {'<br>'.join(notes) or '—'} | "
                     f"{same[name]['max_abs_logprob_diff']:.2e} |")
    lines += [
        "",
        "## Fidelity to the full cache, each path against its own full cache",
        "",
        f"Steps before the first token that differs from the full cache's greedy sequence (of {new_tokens}), and "
        "the share of tokens equal to the full cache's at the same position.",
        "",
        "| prompt | " + " | ".join(f"{name} tf | {name} vLLM" for name in POLICIES[1:]) + " |",
        "|---|" + "---|---|" * len(POLICIES[1:]),
    ]
    for i, pid in enumerate(ids):
        cells = []
        for name in POLICIES[1:]:
            for path in paths:
                row = to_full[path][name]["prompts"][i]
                cells.append(f"{row['steps_before_difference']} ({row['share_equal']:.0%})")
        lines.append(f"| {pid} | " + " | ".join(cells) + " |")
    cells = []
    for name in POLICIES[1:]:
        for path in paths:
            cells.append(f"**{to_full[path][name]['mean_steps']:.1f} ({to_full[path][name]['mean_share']:.1%})**")
    lines.append("| mean | " + " | ".join(cells) + " |")
    lines += ["", "## Commands and wall times", "", "```bash", "bash benchmarks/vllm/fidelity.sh   "
              f"# out/vllm/fidelity, {len(ids)} prompts, {new_tokens} tokens, budget {budget}", "```", "",
              "It runs, each heavy step under `flock /tmp/momentkv-bench.lock` (the wait is not counted):", "",
              "```bash",
              f"env -u MOMENTKV_VLLM_POLICY VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python tests/vllm/run_vllm.py "
              ".venv-vllm/models/smollm2 out/vllm/fidelity/request.json out/vllm/fidelity/vllm.json",
              f".venv/bin/python benchmarks/vllm/fidelity_reference.py .venv-vllm/models/smollm2 "
              f"out/vllm/fidelity/transformers.json --prompts {len(ids)} --new-tokens {new_tokens} --budget {budget} "
              "--top 5", "```", ""]
    runs = ", ".join(f"{name} {vl['runs'][name]['seconds']} s (generate() {vl['runs'][name]['generate_seconds']} s)"
                     for name in vl["runs"])
    if "vllm" in wall:
        lines.append(f"- vLLM: {wall['vllm']['seconds']} s in all, one process, three engines one after the "
                     f"other, in this order: {runs}.")
    tf_cases = ", ".join(f"{name} {sum(tf['cases'][name]['seconds']):.0f} s" for name in POLICIES)
    if "transformers" in wall:
        lines.append(f"- transformers: {wall['transformers']['seconds']} s in all ({tf.get('torch_threads')} torch "
                     f"threads): {tf_cases} for the {len(ids)} prompts.")
    lines.append("- Two shared CPU cores; the times vary with the machine's load and are not a speed benchmark.")
    lines += ["", "vLLM's three engines run in one process, the full cache last: vLLM loads its general plugins once "
              "per process, so a first engine started with `VLLM_PLUGINS=none` leaves momentkv's plugin unloaded in "
              "the main process and the later engines' `additional_config` policy silently unapplied (their outputs "
              "then equal the full cache's bit for bit, which this script refuses)."]
    results_path.write_text("\n".join(lines) + "\n")

    def small(outputs):
        return [{"tokens": o["tokens"], "chosen_logprobs": [round(v, 6) for v in o["chosen_logprobs"]]}
                for o in outputs]

    raw = {"model": "SmolLM2-135M-Instruct", "vllm": vl["vllm"], "new_tokens": new_tokens, "budget": budget,
           "prompt_ids": ids, "prompt_lengths": [len(p) for p in prompts["prompts"]], "wall_seconds": wall,
           "vllm_vs_transformers": same, "against_full_cache": to_full,
           "outputs": {path: {name: small(paths[path][name]) for name in POLICIES} for path in paths}}
    raw_path.write_text(json.dumps(raw, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
