"""Tensor operations per decode step, by region: how many aten ops momentkv issues, against the model's own.

On the CPU at decode sizes, a step's cost is largely the per-operation overhead of PyTorch's dispatcher and
kernels launched on tiny tensors, so the number of operations matters as much as their size. A
``TorchDispatchMode`` sees every aten operation after PyTorch's own decompositions (views and in-place ops
included: each is one trip through the dispatcher). :class:`OpCounts` attributes each operation issued inside
the model's forward to a region (:mod:`momentkv.bench.regions`): the cache's ``update``, the attention function,
the scorers' ``observe``, or the rest of the model; operations of ``generate`` outside the forward (sampling,
stopping criteria) are not counted.

Counting slows every operation down, so it runs in its own generation, never in a timed one.
"""

from __future__ import annotations

import statistics
from collections import Counter
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

from momentkv.bench.regions import MODEL, MOMENTKV_REGIONS, Regions, watch_layers

REGIONS = (*MOMENTKV_REGIONS, MODEL)


class OpCounts(Regions):
    """Operations per forward call (``steps[0]`` is the prompt's), by region."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers
        self.steps: list[Counter] = []
        self._pending = 0  # operations since the last region boundary
        self._step: Counter | None = None  # the forward call under way, if any

    def add(self) -> None:
        if self._step is not None:
            self._pending += 1

    def close(self, region: str) -> None:
        if self._step is not None:
            self._step[region] += self._pending
        self._pending = 0

    def begin_step(self) -> None:
        self._step, self._pending, self.current = Counter(), 0, MODEL

    def end_step(self) -> None:
        self.enter(MODEL)  # the output head's operations, or an attention span nothing closed: the model's
        self.steps.append(self._step)
        self._step = None

    def per_decode_step(self) -> dict[str, float]:
        """Mean over decode steps (every forward after the first) of the operations in each region and in all
        (``total``); empty when the run decoded nothing. A mean, like the time shares, covers the steps before
        the budget fills and those after alike, and the regions add up to the total."""
        decode = self.steps[1:]
        if not decode:
            return {}
        means = {region: statistics.fmean(step[region] for step in decode) for region in REGIONS}
        means["total"] = statistics.fmean(sum(step.values()) for step in decode)
        return means


class _CountingMode(TorchDispatchMode):
    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.add()
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(model, cache):
    """Count the operations of every forward of ``model`` with ``cache``, by region; yields the :class:`OpCounts`.

    Only ``cache``'s layers are watched (instance attributes) and the forward hooks are removed on exit.
    """
    counts = OpCounts(layers=len(cache.layers))
    watch_layers(cache, counts)
    hooks = [
        model.register_forward_pre_hook(lambda module, args: counts.begin_step()),
        model.register_forward_hook(lambda module, args, output: counts.end_step()),
    ]
    try:
        with _CountingMode(counts):
            yield counts
    finally:
        for hook in hooks:
            hook.remove()
