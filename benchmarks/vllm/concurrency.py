"""K concurrent requests of N generated tokens in one fixed KV space: plain vLLM against momentkv's policies.

    .venv-vllm/bin/python benchmarks/vllm/concurrency.py MODEL_DIR OUT.json --policy moment.yaml \
        [--requests 32] [--new-tokens 1024] [--blocks 120] [--block-size 32] [--budget 128]

``--policy plain`` runs vLLM with no plugin loaded (``VLLM_PLUGINS=none``), ``--policy none`` with the plugin
loaded and no policy, any other value is a momentkv policy (a built-in name or a path; ``--budget`` overrides
its ``decode.budget``). One configuration per process, so nothing of one engine leaks into the next
(``benchmarks/vllm/concurrency.sh`` runs them all and writes the table).

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, for every configuration alike),
so that after each engine step the scheduler itself is read: requests running and waiting, KV blocks in use,
blocks each request holds, preemptions. The KV space is fixed in blocks (``num_gpu_blocks_override``), the
same for every configuration. Prompts: the prompt set's held-out prompts (chat-templated, cycled to K),
greedy, ``ignore_eos`` so every request generates exactly N tokens, float32, eager.

Writes OUT.json: the configuration, wall time of the generation loop, output tokens and tokens/s, requests
running at once (most, and mean over steps), preemptions, peak KV blocks in use, per request its prompt
length and the most blocks it held, and per engine step the requests running after it and its seconds
(running counts after a step; a step that prefills recomputed requests is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def held_out_prompts(model_dir: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from momentkv.eval.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_prompts(split="heldout")
    prompts = []
    for i in range(count):
        text = records[i % len(records)].prompt
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return prompts


def external(request_id: str) -> str:
    """The id given to ``add_request`` (vLLM may add a suffix of its own inside the engine)."""
    return request_id.split("-")[0]


def policy_config(policy: str, budget: int | None) -> dict:
    if budget is None:
        return {"momentkv": {"policy": policy}}
    return {"momentkv": {"policy": {"extends": policy, "decode": {"budget": budget}}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--policy", required=True, help="plain, none, or a momentkv policy (name or path)")
    parser.add_argument("--budget", type=int, default=None, help="decode.budget for the policy")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=120, help="KV blocks in all (num_gpu_blocks_override)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16 for FlashAttention on a GPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="let vLLM capture its (piecewise) CUDA graphs instead of running eagerly (a GPU)")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.policy == "plain":
        os.environ["VLLM_PLUGINS"] = "none"
    os.environ.pop("MOMENTKV_VLLM_POLICY", None)

    import torch
    from vllm import LLM, SamplingParams

    prompts = held_out_prompts(args.model_dir, args.requests)
    extra = {} if args.policy in ("plain", "none") else {"additional_config": policy_config(args.policy, args.budget)}
    start = time.perf_counter()
    llm = LLM(model=args.model_dir, dtype=args.dtype, enforce_eager=not args.cuda_graphs, seed=0,
              enable_prefix_caching=False,
              max_model_len=max(map(len, prompts)) + args.new_tokens + 8, block_size=args.block_size,
              num_gpu_blocks_override=args.blocks, max_num_seqs=args.requests,
              gpu_memory_utilization=0.5,  # host memory reserved; the KV space is fixed by the block count
              **extra)
    startup = time.perf_counter() - start
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    holders = manager.coordinator.single_type_managers[0].req_to_blocks

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)

    steps, running_sum, most_running, peak_used = 0, 0, 0, 0
    usable = pool.num_gpu_blocks - 1  # the null block is never handed out
    held: dict[str, int] = {}
    preempted: dict[str, int] = {}
    tokens: dict[str, int] = {}
    start = time.perf_counter()
    step_times: list[list] = []  # [requests running, seconds] per engine step
    while engine.has_unfinished_requests():
        began = time.perf_counter()
        for out in engine.step():
            tokens[external(out.request_id)] = len(out.outputs[0].token_ids)
        step_times.append([len(scheduler.running), round(time.perf_counter() - began, 5)])
        steps += 1
        running_sum += len(scheduler.running)
        most_running = max(most_running, len(scheduler.running))
        peak_used = max(peak_used, usable - pool.get_num_free_blocks())
        for rid, blocks in holders.items():
            held[external(rid)] = max(held.get(external(rid), 0), len(blocks))
        for rid, request in scheduler.requests.items():
            preempted[external(rid)] = max(preempted.get(external(rid), 0), request.num_preemptions)
    wall = time.perf_counter() - start
    generated = sum(tokens.values())
    assert generated == args.requests * args.new_tokens, (generated, tokens)
    result = {
        "policy": args.policy, "budget": args.budget, "requests": args.requests, "new_tokens": args.new_tokens,
        "blocks": usable, "block_size": args.block_size, "startup_s": round(startup, 1),
        "wall_s": round(wall, 2), "output_tokens": generated, "tokens_per_s": round(generated / wall, 2),
        "steps": steps, "most_running": most_running, "mean_running": round(running_sum / max(steps, 1), 2),
        "preemptions": sum(preempted.values()), "peak_blocks_in_use": peak_used,
        "per_request": [{"prompt": len(ids), "most_blocks": held.get(str(i), 0)} for i, ids in enumerate(prompts)],
        "step_times": step_times,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_request", "step_times")}))


if __name__ == "__main__":
    main()
