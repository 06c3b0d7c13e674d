"""Time split of a run, measured from outside the engine: momentkv's update, the attention function, scoring.

``instrument(cache)`` reports the cache's layers to a :class:`StepTimes` through
:func:`~momentkv.bench.regions.watch_layers` and returns it. The spans:

- ``update``: the layer's ``update``: storing the new token and, with a budget, ranking and eviction (for
  transformers' ``DynamicCache``, its append);
- ``attention``: the attention function, from ``update`` returning to ``observe`` being called: the layer's
  mask, then SDPA (or the family's eager attention), or on a step that scores, the single pass that gives the
  output and the attention per cached token (the fused kernel on CUDA);
- ``observe``: the scorers folding this step's attention into their state.

Everything else in the wall time is the model (projections, norms, RoPE, MLP, the output head, Python) and
``generate``'s own work. PyTorch's CPU ops run synchronously, so the wall-clock spans are exact on the CPU; on
a GPU they would need a synchronisation at each boundary and are not reported there.
"""

from __future__ import annotations

import time

from momentkv.bench.regions import MOMENTKV_REGIONS, Regions, watch_layers


class StepTimes(Regions):
    """Seconds accumulated over a run (all layers, prefill included) in each of momentkv's regions."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = dict.fromkeys(MOMENTKV_REGIONS, 0.0)
        self._since = time.perf_counter()

    def close(self, region: str) -> None:
        now = time.perf_counter()
        if region in self.seconds:
            self.seconds[region] += now - self._since
        self._since = now

    update = property(lambda self: self.seconds["update"])
    attention = property(lambda self: self.seconds["attention"])
    observe = property(lambda self: self.seconds["observe"])


def instrument(cache) -> StepTimes:
    """Time every layer of ``cache`` into one :class:`StepTimes`."""
    times = StepTimes()
    watch_layers(cache, times)
    return times
