"""What an attention scorer observes at one update: the current query, or a window of recent queries.

By default (``window: 0``) an attention scorer reads ``ctx.attention``, the attention the current query gives
each token averaged over the query heads of its KV head, after every decode step.

With ``window: w > 0`` it is updated only when the layer is about to rank its tokens (every ``cadence``
steps once the budget is full) and reads the attention of the last ``w`` queries, as R-KV (Cai et al.,
arXiv 2505.24133) and G-KV (Liao et al., arXiv 2512.00504) score tokens at each compression:

1. ``ctx.window_attention(w)``: ``(batch, kv_heads, groups, w, tokens)``, one softmax row per query head and
   query, over every stored key;
2. reduced over the query heads of the group (``group: mean`` or ``max``), then averaged over the queries.
   Both methods reduce the group first (G-KV takes the maximum of the heads' softmax attention, as here;
   R-KV's code takes the maximum of the logits before its softmax, which the softmax rows cannot give back);
3. ``rescale: max`` divides it by its largest value per (batch row, KV head), as G-KV does before merging a
   new observation into its history.

The window's own tokens (the ``w`` newest, whose queries form the window) are *fresh*: the methods keep them
unconditionally and score only the tokens before the window, so a stateful scorer does not fold a fresh
token's partial observation into its history; it scores a fresh token by its observation alone. Give such a
policy ``recent: window + 1`` (the window's tokens and the incoming one) to keep them, as the methods do.

Finally ``kernel > 1`` pools the scores over neighbouring tokens in sequence order (max or average, odd kernel,
stride 1), as SnapKV and R-KV do, over the tokens that are neither fresh nor padding; slots are not in sequence
order once eviction has reused them, so the pooling sorts by position first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from momentkv.pooling import odd_kernel, pool_tokens
from momentkv.scoring.base import ScoreContext, Scorer


def field_error(field: str, message: str) -> PydanticCustomError:
    """A rule broken by ``field`` of a scorer; the policy loader reports it at that field's path and line."""
    return PydanticCustomError(
        "policy_rule", "{details}", {"details": f"{field}: {message}", "problems": [((field,), message)]}
    )


class AttentionObservation(Scorer):
    """Base class of the attention scorers: the observation options shared by ``ema``, ``accumulated``,
    ``instantaneous`` and ``peak`` (see the module docstring)."""

    batched_now = True
    reads_cache = False

    window: int = Field(
        0, ge=0, le=4096,
        description="0: the current query's attention, every step. w > 0: the attention of the last w queries, "
        "taken only when the layer ranks its tokens (R-KV, G-KV).",
    )
    group: Literal["mean", "max"] = Field(
        "mean", description="Reduction over the query heads of a KV head: mean, or max (R-KV, G-KV; needs window > 0).",
    )
    kernel: int = Field(
        1, ge=1, le=255, description="Pooling of the scores over neighbouring tokens in sequence order (odd; 1: none).",
    )
    pool: Literal["max", "avg"] = Field("max", description="Pooling of the scores: max or avg.")
    rescale: Literal["none", "max"] = Field(
        "none", description="none, or max: divide each observation by its largest value before it is merged (G-KV).",
    )

    _odd_kernel = field_validator("kernel")(staticmethod(odd_kernel))

    @model_validator(mode="after")
    def _group_needs_window(self):
        if self.group == "max" and self.window == 0:
            raise field_error(
                "group", "max needs a query window (window > 0): the current query's attention arrives already "
                "averaged over the query heads",
            )
        return self

    def query_window(self) -> int:
        return self.window

    def every_step(self) -> bool:
        return self.window == 0

    def observation(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This update's observation ``(batch, kv_heads, tokens)`` float32, and the fresh tokens (bool, same
        shape; ``None`` without a window): those inside the window, which must not enter a history."""
        if self.window == 0:
            observed, fresh = ctx.attention, None
        else:
            rows = ctx.window_attention(self.window)  # (b, kv, g, w, T)
            if rows.shape[3] == 0:  # no query seen yet: nothing observed
                return torch.zeros(ctx.positions.shape, dtype=torch.float32, device=ctx.positions.device), None
            grouped = rows.amax(dim=2) if self.group == "max" else rows.mean(dim=2)  # (b, kv, w, T)
            observed = grouped.mean(dim=2)  # (b, kv, T)
            fresh = ctx.age < rows.shape[3]  # the window's own tokens
        if self.rescale == "max":
            observed = self._rescaled(observed, self._excluded(ctx, fresh))
        return observed, fresh

    @staticmethod
    def _excluded(ctx: ScoreContext, fresh: torch.Tensor | None) -> torch.Tensor | None:
        """Tokens outside the scored set: fresh ones and padding."""
        if ctx.valid is None:
            return fresh
        return ~ctx.valid if fresh is None else fresh | ~ctx.valid

    @staticmethod
    def _rescaled(observed: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
        """``observed / max(observed)`` per (batch row, KV head), the maximum taken over the scored tokens."""
        scored = observed if excluded is None else observed.masked_fill(excluded, 0.0)
        peak = scored.amax(dim=-1, keepdim=True) if scored.shape[-1] else scored.sum(-1, keepdim=True)
        return observed / peak.clamp_min(torch.finfo(torch.float32).tiny)

    def finish(self, ctx: ScoreContext, scores: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        """Pool ``scores`` ``(batch, kv_heads, tokens)`` over neighbours in sequence order (``kernel > 1``)."""
        if self.kernel == 1 or scores.shape[-1] == 0:
            return scores
        return pool_in_sequence(scores, ctx.positions, self._excluded(ctx, fresh), self.kernel, self.pool)


def pool_in_sequence(scores: torch.Tensor, positions: torch.Tensor, excluded: torch.Tensor | None, kernel: int,
                     pool: str) -> torch.Tensor:
    """Pool ``scores`` ``(batch, kv_heads, tokens)`` along the tokens sorted by ``positions``.

    Excluded tokens take no part: they count as the padding at a sequence's ends (``-inf`` for max pooling,
    0 for average pooling) and keep their own score.
    """
    order = positions.argsort(dim=-1)  # slot order -> sequence order, per (row, KV head)
    ordered = scores.gather(-1, order)
    if excluded is not None:
        left_out = excluded.gather(-1, order)
        filler = float("-inf") if pool == "max" else 0.0
        pooled = pool_tokens(ordered.masked_fill(left_out, filler), kernel, pool)
        pooled = torch.where(left_out, ordered, pooled)
    else:
        pooled = pool_tokens(ordered, kernel, pool)
    return torch.empty_like(scores).scatter_(-1, order, pooled)
