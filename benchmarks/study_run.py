"""Run the fidelity study's passes in parallel worker processes and save the raw per-step data.

    python benchmarks/study_run.py --out DIR [--new-tokens 512] [--workers 10] [--deadline-s 400] [--device cuda]
        [--select LABEL ...]

1. Load SmolLM2, encode the built-in prompt set, generate the full-cache reference once (all prompts in one
   left-padded batch) and share it with the workers through a memory-mapped file.
2. Workers take tasks in priority order (teacher-forced replay of the comparison policies at B = 64, 32, 128,
   then the tuning variants, then free-running greedy decoding of the comparison policies), each with the
   same batch as the reference, until the deadline; a task that would not finish in time is not started.
3. Save ``study_tf.pt`` (per-step KL, agreement, NLL, first eviction step per config), ``study_free.pt``
   (free-running tokens) and ``study_meta.json``; then time each built-in policy at batch 1 (``cost.json``).
``--select`` runs only the named tasks, in the order given: ``name@budget`` for a teacher-forced replay,
``free:name@budget`` for free-running decoding, ``full`` for the full cache's own replay (names from
``study_policies.py``). ``study_report.py`` turns these into docs/results.md's tables and plots. ``--tiny`` runs the same pipeline on
a tiny random model (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study_policies import comparison, tuning  # noqa: E402

BUDGETS = (64, 32, 128)


def tasks_in_order(budgets=BUDGETS) -> list[tuple[str, dict, int | None]]:
    """``(pass, policy dict, budget)`` in priority order; ``pass`` is ``tf`` or ``free``."""
    tasks = [("tf", {"name": "full", "decode": None}, None)]
    tasks += [("tf", p, b) for b in budgets for p in comparison(b)]
    tasks += [("tf", p, b) for b in budgets for p in tuning(b)]
    tasks += [("free", p, b) for b in budgets for p in comparison(b)]
    tasks += [("free", p, b) for b in budgets for p in tuning(b)]
    return tasks


def select_tasks(labels: list[str], budgets=BUDGETS) -> list[tuple[str, dict, int | None]]:
    """The tasks named by ``labels`` (see the module docstring), in that order; unknown labels raise."""
    catalog = {}
    for kind, policy, budget in tasks_in_order(budgets):
        label = policy["name"] + ("" if budget is None else f"@{budget}")
        catalog[label if kind == "tf" else f"free:{label}"] = (kind, policy, budget)
    unknown = [label for label in labels if label not in catalog]
    if unknown:
        raise SystemExit(f"unknown task labels {unknown}; known: {sorted(catalog)}")
    return [catalog[label] for label in labels]


def _load_model(args, device):
    if args.tiny:
        from tests.models import tiny_model
        if args.tiny_shape:  # SmolLM2-135M's shapes with random weights: real timings without the weights
            return tiny_model(layers=30, hidden_size=576, intermediate_size=1536, heads=9, kv_heads=3, head_dim=64,
                              vocab_size=49152).to(device)
        return tiny_model(layers=2).to(device)
    return torch.load(args.model_dir, weights_only=False).eval().to(device)  # pickled by the parent


def _batches(meta, device):
    from momentkv.eval.batches import make_batches
    return make_batches(meta["encoded"], len(meta["encoded"]), meta["pad_id"], device)


def worker(rank, args, meta, task_q, result_q, deadline):
    torch.set_float32_matmul_precision("highest")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from momentkv.eval.freerun import free_running
    from momentkv.eval.full_cache_reference import Reference
    from momentkv.eval.replay import teacher_forced
    from momentkv.policy import load_policy

    model = _load_model(args, device)
    ref = torch.load(args.ref_path, mmap=True)
    reference = Reference(tokens=ref["tokens"], logprobs=ref["logprobs"], suppressed=meta["suppressed"])
    batches = _batches(meta, device)
    last = 0.0
    while True:
        try:
            index, (kind, policy, budget) = task_q.get_nowait()
        except queue.Empty:
            break
        if time.time() + last * 1.1 > deadline:
            result_q.put((index, kind, "skipped", None, 0.0))
            continue
        started = time.time()
        resolved = load_policy(policy)
        if kind == "tf":
            m = teacher_forced(model, resolved, batches, reference)
            payload = {"kl": m.kl.float(), "agree": m.agree, "nll": m.nll.float(), "active_from": m.active_from,
                       "kv_bytes": m.kv_bytes, "stored": m.stored}
        else:
            f = free_running(model, resolved, batches, reference)
            payload = {"tokens": f.tokens.to(torch.int32)}
        last = time.time() - started
        part = Path(args.parts_dir) / f"task{index}.pt"
        torch.save(payload, part)  # tensors travel as files: a queue would share memory the worker frees on exit
        result_q.put((index, kind, "done", str(part), last))
        print(f"[worker {rank}] {kind} {policy['name']}@{budget}: {last:.1f}s", flush=True)


def cost_benchmark(args, meta, device, out: Path, seconds_cap: float) -> None:
    """tokens/s and stored KV bytes of each built-in policy vs the full cache, batch 1, one prompt."""
    import momentkv
    from momentkv.eval.stepping import run_steps, suppress

    model = _load_model(args, device)
    prompt = meta["encoded"][meta["cost_prompt"]]
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    rows = []
    for name in ("full.yaml", "recency.yaml", "tova.yaml", "h2o.yaml", "scope.yaml", "moment.yaml"):
        with momentkv.patched(model, name) as handle:
            cache = handle.new_cache()
            chosen, times = [], []
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for step, logits, _ in run_steps(model, cache, ids, mask, args.cost_tokens, lambda s, _: chosen[s]):
                chosen.append(suppress(logits, meta["suppressed"]).argmax(-1))
                if step % 64 == 0 and time.perf_counter() - started > seconds_cap:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            stats = cache.stats()
            rows.append({"policy": name, "tokens": len(chosen), "seconds": elapsed,
                         "tokens_per_s": len(chosen) / elapsed, "kv_bytes": stats["kv_bytes"],
                         "state_bytes": stats["state_bytes"], "stored": stats["stored"],
                         "prompt_tokens": len(prompt), "layers": len(stats["layers"])})
            print(json.dumps(rows[-1]), flush=True)
    (out / "cost.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=400.0, help="seconds from start; no task starts late")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cost-tokens", type=int, default=1024)
    parser.add_argument("--cost-cap-s", type=float, default=15.0)
    parser.add_argument("--model-dir", default="/dev/shm/momentkv-smollm2.pt")
    parser.add_argument("--ref-path", default="/dev/shm/momentkv-reference.pt")
    parser.add_argument("--parts-dir", default="/dev/shm/momentkv-parts")
    parser.add_argument("--limit-tasks", type=int, default=None)
    parser.add_argument("--select", nargs="+", default=None, help="only these tasks, in this order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="take the reference saved at --ref-path by an earlier run instead of generating it")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 4 prompts (smoke test)")
    parser.add_argument("--tiny-shape", action="store_true", help="with --tiny: SmolLM2's shapes, 28 prompts")
    args = parser.parse_args()
    tasks = (select_tasks(args.select) if args.select else tasks_in_order())[: args.limit_tasks]
    start = time.time()
    torch.set_float32_matmul_precision("highest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    from momentkv import models
    from momentkv.eval.prompts import encode_prompts, load_prompts
    from momentkv.eval.full_cache_reference import generate_reference

    records = load_prompts()
    if args.tiny:
        model = _load_model(args, device)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(60, 420, (len(records),), generator=g).tolist() if args.tiny_shape else (9, 14, 6, 11)
        encoded = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
        records, suppressed, pad_id = records[: len(encoded)], [2], 0
    else:
        model, tokenizer = models.load("smollm2")
        torch.save(model, args.model_dir)  # save_pretrained refuses GGUF-loaded models
        model = model.to(device)
        encoded = encode_prompts(tokenizer, records)
        suppressed, pad_id = models.eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    meta = {"encoded": encoded, "pad_id": pad_id, "suppressed": suppressed, "steps": args.new_tokens,
            "prompts": [r.__dict__ for r in records], "device": str(device),
            "cost_prompt": next(i for i, r in enumerate(records) if r.kind == "free"),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    import transformers
    meta["transformers"] = transformers.__version__
    batches = _batches(meta, device)
    t0 = time.time()
    if args.reuse_reference:  # a reference an earlier run saved for the same prompts, model and length
        reference = torch.load(args.ref_path, mmap=True)
        if tuple(reference["tokens"].shape) != (len(encoded), args.new_tokens):
            raise SystemExit(f"{args.ref_path} holds {tuple(reference['tokens'].shape)} tokens, "
                             f"not {(len(encoded), args.new_tokens)}")
        tokens, logprobs = reference["tokens"], reference["logprobs"]
    else:
        reference = generate_reference(model, batches, args.new_tokens, suppressed, store_device="cpu")
        tokens, logprobs = reference.tokens, reference.logprobs
        torch.save({"tokens": tokens, "logprobs": logprobs}, args.ref_path)
    meta["reference_seconds"] = time.time() - t0
    ref_nll = -logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    del reference, model, tokens, logprobs
    print(f"reference: {meta['reference_seconds']:.1f}s; setup {time.time() - start:.1f}s", flush=True)

    Path(args.parts_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    task_q, result_q = ctx.Queue(), ctx.Queue()
    for item in enumerate(tasks):
        task_q.put(item)
    deadline = start + args.deadline_s
    procs = [ctx.Process(target=worker, args=(r, args, meta, task_q, result_q, deadline))
             for r in range(args.workers)]
    for p in procs:
        p.start()
    results, pending = {}, len(tasks)
    while pending:
        try:
            index, kind, status, payload, seconds = result_q.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        pending -= 1
        if status == "done":
            results[index] = (torch.load(payload), seconds)
    for p in procs:
        p.join()
    tf, free = [], []
    for index, (kind, policy, budget) in enumerate(tasks):
        if index not in results:
            continue
        payload, seconds = results[index]
        entry = {"label": policy["name"] + ("" if budget is None else f"@{budget}"), "name": policy["name"],
                 "budget": budget, "policy": policy, "seconds": seconds, **payload}
        (tf if kind == "tf" else free).append(entry)
    torch.save({"configs": tf, "reference_nll": ref_nll.float()}, out / "study_tf.pt")
    ref = torch.load(args.ref_path, mmap=True)
    torch.save({"configs": free, "reference_tokens": ref["tokens"].to(torch.int32)}, out / "study_free.pt")
    meta["tasks"] = len(tasks)
    meta["done_tf"], meta["done_free"] = len(tf), len(free)
    meta["study_seconds"] = time.time() - start
    (out / "study_meta.json").write_text(json.dumps(meta))
    print(f"done: {len(tf)} teacher-forced, {len(free)} free-running of {len(tasks)} tasks in "
          f"{meta['study_seconds']:.0f}s", flush=True)
    if args.cost_tokens > 0:
        cost_benchmark(args, meta, device, out, args.cost_cap_s)
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
