"""Per-layer schedules: a few values spread over a model's layers (budget lists, PyramidKV capacities)."""

from __future__ import annotations

import math


def interpolate(points: list[int], layer_idx: int, num_layers: int) -> int:
    """``points`` spread evenly from layer 0 to the last layer, interpolated linearly in between and rounded
    to the nearest token (at least 1); as many points as layers gives each layer its own, one point all."""
    if len(points) == 1 or num_layers == 1:
        return points[0]
    if len(points) == num_layers:
        return points[layer_idx]
    x = layer_idx / (num_layers - 1) * (len(points) - 1)
    lo = min(int(math.floor(x)), len(points) - 2)
    frac = x - lo
    return max(1, round(points[lo] * (1 - frac) + points[lo + 1] * frac))
