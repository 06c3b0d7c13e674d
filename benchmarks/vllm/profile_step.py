"""Where a steady decode step goes: per-phase time of momentkv's vLLM backend, or of vLLM's own attention.

    .venv-vllm/bin/python benchmarks/vllm/profile_step.py MODEL_DIR moment.yaml [--new-tokens 260] [--budget 128]
    .venv-vllm/bin/python benchmarks/vllm/profile_step.py MODEL_DIR plain

32 requests (the held-out prompts twice, chat-templated), greedy, float32, eager, in a KV space large enough
that nothing is preempted (1,600 blocks of 32 tokens), the engine core in this process. Each phase is a method
wrapped with a timer (``time.perf_counter``, inclusive: a phase's time holds the phases it calls); the table
gives its milliseconds per engine step and calls per step over the last 99 steps (all steady once
``new_tokens - 100`` exceeds the budget), and the median step. ``plain`` runs vLLM without the plugin, timing
its CPU attention impl's ``forward``. The timers add a few microseconds per call: compare phases, not the
median step against an untimed run.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path


def timed(acc: collections.Counter, calls: collections.Counter, cls: type, name: str, label: str | None = None):
    """Wrap ``cls.name`` with a timer adding to ``acc[label]`` and ``calls[label]``."""
    original = getattr(cls, name)
    label = label or f"{cls.__name__}.{name}"

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - began
            calls[label] += 1

    setattr(cls, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("policy", help="plain, or a momentkv policy (name or path)")
    parser.add_argument("--new-tokens", type=int, default=260)
    parser.add_argument("--budget", type=int, default=128)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.policy == "plain":
        os.environ["VLLM_PLUGINS"] = "none"
    sys.path.insert(0, str(Path(__file__).parent))
    from concurrency import held_out_prompts, policy_config

    acc: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    timed(acc, calls, CPUAttentionBackendImpl, "forward", "vLLM CPU attention forward")
    if args.policy != "plain":
        from momentkv.core import eviction, native_scoring, paged, paged_probs, paged_write
        from momentkv.integrations.vllm import evicting

        for name in ("forward", "_write", "_victims", "_fold", "_attention"):
            timed(acc, calls, evicting.EvictingImpl, name)
        timed(acc, calls, evicting.EvictingBuilder, "build")
        timed(acc, calls, paged_probs.PagedProbs, "__call__")
        timed(acc, calls, paged_write.PagedWrite, "__call__")
        timed(acc, calls, native_scoring.NativeStep, "paged")
        timed(acc, calls, native_scoring.NativeStep, "__call__")
        for name in ("fold", "fold_in_place", "lowest"):
            timed(acc, calls, eviction.LayerEviction, name)
        for name in ("load", "store", "read"):
            timed(acc, calls, paged.PagedStates, name)

    import torch
    from vllm import LLM, SamplingParams

    prompts = held_out_prompts(args.model_dir, 32)
    extra = {} if args.policy == "plain" else {"additional_config": policy_config(args.policy, args.budget)}
    llm = LLM(model=args.model_dir, dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
              max_model_len=max(map(len, prompts)) + args.new_tokens + 8, block_size=32,
              num_gpu_blocks_override=1600, max_num_seqs=32, gpu_memory_utilization=0.5, **extra)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    first = args.new_tokens - 100
    steps: list[float] = []
    while engine.has_unfinished_requests():
        if len(steps) == first:
            acc.clear()
            calls.clear()
        began = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - began)
    last = steps[first: args.new_tokens - 1]
    print(f"{args.policy}: median step {sorted(last)[len(last) // 2] * 1e3:.1f} ms over {len(last)} steps "
          f"(from step {first}; torch threads {torch.get_num_threads()})")
    print("| phase | ms per step | calls per step |\n|---|---|---|")
    for label, seconds in sorted(acc.items(), key=lambda item: -item[1]):
        print(f"| `{label}` | {seconds / len(last) * 1e3:.2f} | {calls[label] / len(last):.1f} |")


if __name__ == "__main__":
    main()
