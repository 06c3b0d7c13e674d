"""Where a compiled steady-state decode step spends its time, against the same step eager.

SmolLM2-135M-Instruct under ``moment.yaml`` (budget 128): the prompt and 132 greedy steps eagerly (a manual
loop, so the budget is full and the first eviction done), then the forward compiled (its first 3 steps compile
and are timed apart), then 2 rounds of 30 steps eager and 30 compiled on the same cache (milliseconds per step),
then a ``torch.profiler`` table of 10 compiled steps. Usage::

    flock /tmp/momentkv-bench.lock python benchmarks/compiled_step_profile.py
"""

from __future__ import annotations

import time

import torch
import torch.profiler as tp

import momentkv
from momentkv.cli.bench_cmd import DEFAULT_PROMPT
from momentkv.models import load


def main() -> None:
    torch.set_grad_enabled(False)
    model, tokenizer = load("smollm2")
    ids = tokenizer([DEFAULT_PROMPT], return_tensors="pt")["input_ids"]
    cache = momentkv.patch(model, "moment.yaml").new_cache()
    token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    eager = model.forward
    compiled = torch.compile(type(model).forward.__get__(model))

    def steps(forward, n: int) -> float:
        nonlocal token
        began = time.perf_counter()
        for _ in range(n):
            token = forward(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - began) / n * 1e3

    steps(eager, 132)
    print(f"fixed shape: {cache.fixed_shape()}; first 3 compiled steps (compiling): {steps(compiled, 3) * 3 / 1e3:.1f} s")
    for round_ in (1, 2):
        print(f"round {round_}: eager {steps(eager, 30):.1f} ms/step, compiled {steps(compiled, 30):.1f} ms/step")
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        steps(compiled, 10)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
