"""Side-by-side generation runs: tokens/s, stored KV bytes, peak memory and the per-step time split.

Runs alternate between policies (and the unpatched model) inside each repeat, so slow drifts of a noisy
machine hit every policy alike; the median over repeats is reported.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

import momentkv
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
    attention_s: float = 0.0
    update_s: float = 0.0
    observe_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclass
class Summary:
    """Medians over repeats for one (policy, length)."""

    policy: str
    new_tokens: int
    runs: list[RunResult] = field(default_factory=list)

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
    if isinstance(policy, dict):
        return policy.get("name", "custom")
    if isinstance(policy, str):
        return momentkv.load_policy(policy).name
    return policy.name


@torch.no_grad()
def run_once(model, inputs: dict, policy: str | dict, new_tokens: int) -> RunResult:
    """Generate exactly ``new_tokens`` greedily under ``policy`` (or ``"unpatched"``) and measure it."""
    from transformers import DynamicCache

    name = policy_name(policy)
    handle = None
    if policy == UNPATCHED:
        cache, times = DynamicCache(config=model.config), None
    else:
        handle = momentkv.patch(model, policy)
        cache = handle.new_cache()
        times = instrument(cache)
    try:
        with PeakMemory() as memory:
            start = time.perf_counter()
            model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
            seconds = time.perf_counter() - start
        kv_bytes, state_bytes = _cache_bytes(cache)
    finally:
        if handle is not None:
            handle.remove()
    result = RunResult(name, new_tokens, seconds, kv_bytes, state_bytes, memory.peak - memory.start)
    if times is not None:
        result.attention_s, result.update_s, result.observe_s = times.attention, times.update, times.observe
    return result


def run_matrix(model, inputs, policies: list, lengths: list[int], repeats: int, progress=None) -> list[Summary]:
    """Every (policy, length) ``repeats`` times, alternating policies inside each repeat."""
    summaries = {(policy_name(p), n): Summary(policy_name(p), n) for p in policies for n in lengths}
    for repeat in range(repeats):
        for n in lengths:
            order = policies if repeat % 2 == 0 else list(reversed(policies))
            for policy in order:
                result = run_once(model, inputs, policy, n)
                summaries[(result.policy, n)].runs.append(result)
                if progress is not None:
                    progress.update(1)
    return list(summaries.values())
