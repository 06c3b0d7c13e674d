"""The four ways a steady-state decode step can score, timed inside a real generation.

SmolLM2-135M-Instruct, budget 128, greedy, ``N`` new tokens (default 400), batch 1, the run order alternating
over ``REPEATS`` rounds (default 2); for each run: tokens/s and the time split of ``momentkv bench`` (update,
attention, observe: shares of the wall time of generate, summed over layers).

- ``general``: the scorers, the score record and the ranking as objects (the fused step switched off);
- ``fused``: the fused step of ``momentkv/core/fused_scoring.py`` as tensor operations, run eagerly
  (``MOMENTKV_NATIVE_SCORING=0``);
- ``native``: the same step as one C++ call (``momentkv/core/native_scoring.py``; the default on the CPU);
- ``fused+compiled``: the tensor step compiled by inductor (``MOMENTKV_COMPILE_SCORING=1``); its compilation
  happens in an untimed warm-up generation, whose compile time is printed;

with ``recency.yaml`` (its native step) and ``full.yaml`` beside them. First, the same paths alone: one layer's fold and
next victim at SmolLM2's shape (1 row, 3 KV heads, 128 slots, random attention), microseconds per step, the
median of 5 blocks of 2,000 steps. Usage::

    flock /tmp/momentkv-bench.lock python benchmarks/scoring_paths.py [N] [REPEATS]
"""

from __future__ import annotations

import sys
import time

import torch

import statistics

import momentkv
from momentkv.bench.runner import run_once
from momentkv.cli.bench_cmd import DEFAULT_PROMPT
from momentkv.core import compiled, eviction, native_scoring
from momentkv.core.plan import build_plans
from momentkv.models import load
from momentkv.scoring.base import ScoreContext

MODES = (("full", "full.yaml"), ("recency", "recency.yaml"), ("general", "moment.yaml"), ("fused", "moment.yaml"),
         ("native", "moment.yaml"), ("fused+compiled", "moment.yaml"))


def _mode(name: str, spec_of) -> None:
    eviction.fused_spec = (lambda plan: None) if name == "general" else spec_of
    compiled._SETTING = "1" if name == "fused+compiled" else "0"
    native_scoring._SETTING = "1" if name in ("native", "recency", "full") else "0"


def alone(spec_of, heads: int = 3, slots: int = 128, prompt: int = 84) -> None:
    """One layer's steady-state step (fold, then the next victim) by each path, microseconds per step."""
    plan = build_plans(momentkv.load_policy("moment.yaml"), 1, [None])[0]
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(1, heads, slots, generator=g).softmax(-1)
    print("| path (one layer alone) | µs per step |\n|---|---|")
    for name in ("general", "fused", "native", "fused+compiled"):
        _mode(name, spec_of)
        layer = eviction.LayerEviction(plan)
        layer.scoring.start(1, heads, slots, "cpu")
        positions = torch.stack([torch.randperm(slots, generator=g) + prompt for _ in range(heads)]).unsqueeze(0)
        view = ScoreContext(None, None, None, positions=positions, layer_idx=0, num_layers=1)
        view.now = prompt + slots

        def steps(n: int) -> float:
            began = time.perf_counter()
            for _ in range(n):
                view.now = view.now + 1
                layer.fold(attention, view, prompt)
                layer.lowest(view, prompt)
            return (time.perf_counter() - began) / n * 1e6

        steps(50)  # the compiled path compiles here
        print(f"| {name} | {statistics.median(steps(2000) for _ in range(5)):.1f} |", flush=True)


def main(new_tokens: int = 400, repeats: int = 2) -> None:
    torch.set_grad_enabled(False)
    spec_of = eviction.fused_spec
    alone(spec_of)
    model, tokenizer = load("smollm2")
    inputs = tokenizer([DEFAULT_PROMPT], return_tensors="pt")
    _mode("fused+compiled", spec_of)
    began = time.perf_counter()
    run_once(model, inputs, "moment.yaml", 140)  # reaches the budget: compiles the fused step
    print(f"warm-up: {time.perf_counter() - began:.1f} s, compilations: "
          + ", ".join(f"{name} {seconds:.1f} s" for (name, _), seconds in compiled.compile_times().items()))
    print("| round | mode | tokens/s | ms/step | update | attention | observe | update + observe |")
    print("|---|---|---|---|---|---|---|---|")
    for round_ in range(repeats):
        for name, policy in (MODES if round_ % 2 == 0 else tuple(reversed(MODES))):
            _mode(name, spec_of)
            r = run_once(model, inputs, policy, new_tokens)
            shares = [x / r.seconds for x in (r.update_s, r.attention_s, r.observe_s)]
            print(f"| {round_ + 1} | {name} | {r.tokens_per_s:.2f} | {r.seconds / new_tokens * 1e3:.1f} | "
                  + " | ".join(f"{x:.1%}" for x in shares) + f" | {shares[0] + shares[2]:.1%} |", flush=True)
    _mode("native", spec_of)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
