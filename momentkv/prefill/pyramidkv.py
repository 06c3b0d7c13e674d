"""PyramidKV: SnapKV's ranking with more prompt tokens in the lower layers (Cai et al., arXiv 2406.02069).

Attention in the lower layers spreads over the whole prompt and narrows in the upper ones ("pyramidal
information funneling"), so the prompt budget falls linearly from the bottom layer to the top. With an
average of ``C`` tokens per layer and a window of ``w``, the part beyond the window runs from
``2 (C - w) - (C - w) / beta`` in layer 0 down to ``(C - w) / beta`` in the last layer, so the total equals
``C`` per layer, as in the paper (beta = 20). When the bottom layers would keep more than the prompt holds,
they keep it all and the top end rises to keep the average.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from momentkv.prefill.base import resolve_capacity, register_prefill
from momentkv.schedule import interpolate
from momentkv.prefill.snapkv import SnapKV


def pyramid_capacities(average: int, window: int, prompt_len: int, num_layers: int, beta: float) -> list[int]:
    """Per-layer prompt budgets (window included) falling linearly from the bottom layer to the top."""
    spread = max(average - window, 0)  # tokens chosen by score, per layer on average
    low = spread / beta
    high = 2 * spread - low
    room = max(prompt_len - window, 0)
    if high > room:  # the bottom layers cannot keep more than the prompt: shift the budget upwards
        high = room
        low = min(2 * spread - high, room)
    if num_layers == 1 or average <= window:
        return [average] * num_layers
    step = (high - low) / (num_layers - 1)
    return [max(1, round(high - i * step) + window) for i in range(num_layers)]


@register_prefill("pyramidkv")
class PyramidKV(SnapKV):
    """SnapKV with per-layer capacities: a linear pyramid (``capacity`` is the per-layer average), or an
    explicit ``schedule`` of per-layer capacities (interpolated linearly when it has fewer points than the
    model has layers)."""

    beta: float = Field(20.0, gt=1.0, description="Top layer keeps (capacity - window) / beta beyond the window.")
    schedule: list[int] | None = Field(
        None, min_length=1, description="Explicit prompt capacities from the bottom layer to the top, instead "
        "of the pyramid; fewer points than layers are interpolated."
    )

    @model_validator(mode="after")
    def _schedule_or_capacity(self):
        if self.schedule is not None:
            if "capacity" in self.model_fields_set:
                raise ValueError("give either capacity (a pyramid) or schedule (explicit per-layer capacities)")
            if min(self.schedule) < 1:
                raise ValueError("every capacity in schedule must be at least 1")
        return self

    def layer_capacity(self, prompt_len: int, layer_idx: int, num_layers: int) -> int | None:
        if self.schedule is not None:
            return interpolate(self.schedule, layer_idx, num_layers)
        average = resolve_capacity(self.capacity, prompt_len)
        if average >= prompt_len:
            return average
        return pyramid_capacities(average, self.window, prompt_len, num_layers, self.beta)[layer_idx]
