"""PyramidKV: SnapKV's ranking with more prompt tokens in the lower layers (Cai et al., arXiv 2406.02069).

Attention in the lower layers spreads over the whole prompt and narrows in the upper ones ("pyramidal
information funneling"), so the prompt budget falls linearly from the bottom layer to the top. With an
average of ``C`` tokens per layer and a window of ``w``, the part beyond the window runs from
``2 (C - w) - (C - w) / beta`` in layer 0 down to ``(C - w) / beta`` in the last layer, so the total equals
``C`` per layer, as in the paper (beta = 20). When the bottom layers would keep more than the prompt holds,
they keep it all and the top end rises to keep the average.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from momentkv.prefill.base import Capacity, resolve_capacity, register_prefill
from momentkv.schedule import interpolate
from momentkv.prefill.snapkv import SnapKV


def _as_list(value: Any) -> Any:
    """A tuple is a list in the Python API (strict validation would refuse it otherwise)."""
    return list(value) if isinstance(value, tuple) else value


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

    capacity: Capacity | None = Field(
        1024, description="Prompt tokens kept per layer and KV head on average (an integer, or a fraction of the "
        "prompt length in (0, 1]); null when schedule gives the capacities."
    )
    beta: float = Field(20.0, gt=1.0, description="Top layer keeps (capacity - window) / beta beyond the window.")
    schedule: Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_as_list)] | None = Field(
        None, min_length=1, description="Explicit prompt capacities from the bottom layer to the top, instead "
        "of the pyramid; fewer points than layers are interpolated."
    )

    @model_validator(mode="before")
    @classmethod
    def _schedule_replaces_capacity(cls, data: Any) -> Any:
        # A schedule stands in for the capacity: its default (1024) must not be stored beside it, or the
        # policy's own dump (which writes every field) would name both and be refused.
        if isinstance(data, dict) and data.get("schedule") is not None and "capacity" not in data:
            return {**data, "capacity": None}
        return data

    @model_validator(mode="after")
    def _schedule_or_capacity(self):
        if self.schedule is not None and self.capacity is not None:
            raise PydanticCustomError(
                "schedule_or_capacity", "give either capacity (a pyramid) or schedule (explicit per-layer "
                "capacities), not both", {"at": ("schedule",)},
            )
        if self.schedule is None and self.capacity is None:
            raise PydanticCustomError(
                "schedule_or_capacity", "capacity is null: give a capacity (a pyramid) or a schedule",
                {"at": ("capacity",)},
            )
        return self

    def layer_capacity(self, prompt_len: int, layer_idx: int, num_layers: int) -> int | None:
        if self.schedule is not None:
            return interpolate(self.schedule, layer_idx, num_layers)
        average = resolve_capacity(self.capacity, prompt_len)
        if average >= prompt_len:
            return average
        return pyramid_capacities(average, self.window, prompt_len, num_layers, self.beta)[layer_idx]
