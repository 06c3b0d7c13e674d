"""Rescaling of a scorer's output per (batch, kv head), so that scorers of different scales can be summed."""

from __future__ import annotations

import torch

_EPS = 1e-12


_RANK_STEPS: dict = {}


def _rank_steps(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``0, 1/(T-1), ..., 1`` broadcast to ``shape``, made once per shape and device (the decode loop asks
    for the same few shapes every step)."""
    key = (tuple(shape), str(device))
    steps = _RANK_STEPS.get(key)
    if steps is None:
        t = shape[-1]
        steps = torch.arange(t, device=device, dtype=torch.float32).div_(max(t - 1, 1)).expand(shape)
        if len(_RANK_STEPS) > 256:
            _RANK_STEPS.clear()
        _RANK_STEPS[key] = steps
    return steps


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` -> float32 ranks in ``[0, 1]`` along the last axis: 0 for the lowest, 1 for the highest.

    Ties keep their slot order. One sort and one scatter (the inverse permutation), not two sorts.
    """
    order = scores.argsort(dim=-1, stable=True)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    return out.scatter_(-1, order, _rank_steps(scores.shape, scores.device))


def normalize_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Rescale ``scores`` ``(batch, kv_heads, tokens)`` along the token axis.

    ``none`` returns the input; ``sum`` divides by the sum of absolute values; ``max`` by the largest absolute
    value; ``zscore`` subtracts the mean and divides by the standard deviation; ``rank`` maps the lowest score
    to 0 and the highest to 1 (ties keep their slot order).
    """
    if how == "none" or scores.shape[-1] == 0:
        return scores
    if how == "sum":
        return scores / scores.abs().sum(-1, keepdim=True).clamp_min(_EPS)
    if how == "max":
        return scores / scores.abs().amax(-1, keepdim=True).clamp_min(_EPS)
    if how == "zscore":
        centred = scores - scores.mean(-1, keepdim=True)
        return centred / centred.square().mean(-1, keepdim=True).sqrt().clamp_min(_EPS)
    if how == "rank":
        return rank_of(scores)
    raise ValueError(f"unknown normalization {how!r}")
