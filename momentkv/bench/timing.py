"""Per-step time split of a patched model: attention, momentkv's own work, and the rest of the model.

``instrument(cache)`` wraps the ``update`` and ``observe`` methods of *that cache's layers* (instance
attributes: no class changes) and sets ``layer.timer``, which the attention function reads to time the
attention kernel it calls. PyTorch's CPU ops run synchronously, so wall-clock spans are exact; on a GPU the
spans would need a synchronisation and are not reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class StepTimes:
    """Seconds accumulated over a run (all layers)."""

    update: float = 0.0  # storing the new token, incl. selection and eviction when the budget is full
    observe: float = 0.0  # scoring: attention of the query to the cached tokens, scorers, normalisation
    attention: float = 0.0  # the attention kernel itself (SDPA or eager), as the unpatched model runs it

    @property
    def own(self) -> float:
        return self.update + self.observe


def _timed(method, times: StepTimes, field: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            setattr(times, field, getattr(times, field) + time.perf_counter() - start)

    return wrapper


def instrument(cache) -> StepTimes:
    """Time every layer of ``cache`` into one :class:`StepTimes`."""
    times = StepTimes()
    for layer in cache.layers:
        layer.update = _timed(layer.update, times, "update")
        layer.observe = _timed(layer.observe, times, "observe")
        layer.timer = times
    return times
