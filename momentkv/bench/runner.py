"""Side-by-side generation runs: tokens/s, stored KV bytes, peak memory, the time split and operation counts.

Timed runs alternate between policies (and the unpatched model) inside each repeat, so slow drifts of a noisy
machine hit every policy alike; the median over repeats is reported. Operations are counted in one extra,
untimed run per policy and length (counting slows every operation down), and the unpatched model is always
counted, as the reference of the operations momentkv adds.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import momentkv
from momentkv.bench import compiled
from momentkv.bench.op_count import counting
from momentkv.bench.timing import instrument

UNPATCHED = "unpatched"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples the process's resident memory every ``interval`` seconds while active."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@dataclass
class RunResult:
    policy: str
    new_tokens: int
    seconds: float
    kv_bytes: int
    state_bytes: int
    peak_rss_growth: int
    attention_s: float = math.nan  # nan: not measurable (the unpatched model's attention reports to no layer)
    update_s: float = math.nan
    observe_s: float = math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclass
class Summary:
    """Medians over timed repeats for one (policy, length), and the operations counted in its untimed run:
    ``ops`` maps each region and ``total`` to the mean count per decode step (all layers)."""

    policy: str
    new_tokens: int
    runs: list[RunResult] = field(default_factory=list)
    ops: dict[str, float] | None = None
    layers: int = 0
    compile: compiled.CompileReport | None = None  # a compiled entry's warm-up (compilation), apart from the runs

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def _cache_bytes(cache) -> tuple[int, int]:
    """(key/value bytes, bookkeeping bytes) of any transformers cache."""
    if hasattr(cache, "stats"):
        stats = cache.stats()
        return stats["kv_bytes"], stats["state_bytes"]
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
    return kv, 0


def policy_name(policy) -> str:
    """Display name of ``"unpatched"``, a Policy, a dict or a built-in name."""
    if policy == UNPATCHED:
        return UNPATCHED
    if isinstance(policy, compiled.Compiled):
        return policy.name
    if isinstance(policy, dict):
        return policy.get("name", "custom")
    if isinstance(policy, str):
        return momentkv.load_policy(policy).name
    return policy.name


@contextmanager
def _prepared(model, policy):
    """``(name, cache)`` for one run under ``policy`` (or ``"unpatched"``); the patch is removed on exit."""
    from transformers import DynamicCache

    if policy == UNPATCHED:
        yield UNPATCHED, DynamicCache(config=model.config)
        return
    entry = policy if isinstance(policy, compiled.Compiled) else None
    handle = momentkv.patch(model, policy if entry is None else entry.policy)
    if entry is not None:
        model.forward = compiled.compiled_forward(model)
    try:
        yield policy_name(policy), handle.new_cache()
    finally:
        if entry is not None:
            del model.forward
        handle.remove()


def _generate(model, inputs: dict, cache, new_tokens: int) -> None:
    model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


@torch.no_grad()
def run_once(model, inputs: dict, policy, new_tokens: int) -> RunResult:
    """Generate exactly ``new_tokens`` greedily under ``policy`` (or ``"unpatched"``) and measure it."""
    timed = not isinstance(policy, compiled.Compiled)  # wrapped methods would be traced into the compiled graph
    with _prepared(model, policy) as (name, cache):
        times = instrument(cache) if timed else None
        with PeakMemory() as memory:
            start = time.perf_counter()
            _generate(model, inputs, cache, new_tokens)
            seconds = time.perf_counter() - start
        kv_bytes, state_bytes = _cache_bytes(cache)
    result = RunResult(name, new_tokens, seconds, kv_bytes, state_bytes, memory.peak - memory.start)
    if times is not None:
        result.update_s = times.update
    if times is not None and name != UNPATCHED:  # transformers' cache has no observe: its attention span cannot be told apart
        result.attention_s, result.observe_s = times.attention, times.observe
    return result


@torch.no_grad()
def count_once(model, inputs: dict, policy, new_tokens: int) -> tuple[str, dict[str, float], int]:
    """``(name, mean operations per decode step by region, layers)`` of one untimed run."""
    with _prepared(model, policy) as (name, cache):
        with counting(model, cache) as counts:
            _generate(model, inputs, cache, new_tokens)
    return name, counts.per_decode_step(), counts.layers


def run_matrix(model, inputs, policies: list, lengths: list[int], repeats: int, progress=None,
               count_ops: bool = True) -> list[Summary]:
    """Every (policy, length) ``repeats`` times, alternating policies inside each repeat; then, with
    ``count_ops``, one counting run of each and of the unpatched model per length."""
    summaries = {(policy_name(p), n): Summary(policy_name(p), n) for p in policies for n in lengths}
    for policy in policies:  # compile before any timed run: the compiled graphs serve every length
        if isinstance(policy, compiled.Compiled):
            report = compiled.warm_up(policy, model, lambda n, p=policy: _untimed(model, inputs, p, n))
            for n in lengths:
                summaries[(policy.name, n)].compile = report
            if progress is not None:
                progress.update(1)
    for repeat in range(repeats):
        for n in lengths:
            order = policies if repeat % 2 == 0 else list(reversed(policies))
            for policy in order:
                result = run_once(model, inputs, policy, n)
                summaries[(result.policy, n)].runs.append(result)
                if progress is not None:
                    progress.update(1)
    if count_ops:  # a compiled entry is not counted: its operations run inside compiled kernels
        counted = [p for p in policies if not isinstance(p, compiled.Compiled)]
        counted = counted if UNPATCHED in counted else [UNPATCHED, *counted]
        for n in lengths:
            for policy in counted:
                name, ops, layers = count_once(model, inputs, policy, n)
                summary = summaries.setdefault((name, n), Summary(name, n))
                summary.ops, summary.layers = ops, layers
                if progress is not None:
                    progress.update(1)
    return list(summaries.values())


@torch.no_grad()
def _untimed(model, inputs: dict, policy, new_tokens: int) -> None:
    with _prepared(model, policy) as (_, cache):
        _generate(model, inputs, cache, new_tokens)


def counting_runs(policies: list, lengths: list[int]) -> int:
    """How many counting runs :func:`run_matrix` makes (for a progress bar; plus one warm-up per compiled entry)."""
    plain = [p for p in policies if not isinstance(p, compiled.Compiled)]
    return len(lengths) * (len(plain) + (UNPATCHED not in plain))
