"""SnapKV: keep the prompt tokens that the last prompt queries attend to (Li et al., arXiv 2404.14469).

The last ``window`` prompt queries act as an observation window. Each earlier prompt token is scored by the
attention those queries give it, summed over the window, pooled over neighbouring tokens (so that a token
next to an important one survives with it), and averaged over the query heads that share a KV head. Each KV
head keeps its ``capacity - window`` best-scored tokens plus the window itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from momentkv.pooling import odd_kernel, pool_tokens
from momentkv.prefill.base import BudgetedCompressor, PrefillContext, keep_top, register_prefill


def snapkv_scores(window_attention: torch.Tensor, kernel: int, pooling: str, keep_window: int) -> torch.Tensor:
    """SnapKV's ranking of the prompt tokens, per KV head.

    Args:
        window_attention: ``(batch, kv_heads, groups, window, prompt)``, see ``PrefillContext``.
        kernel, pooling: the pooling over neighbouring tokens.
        keep_window: how many of the last prompt tokens are kept unconditionally (the window, or fewer
            when the capacity is smaller than the window).

    Returns:
        ``(batch, kv_heads, prompt)`` float32: pooled, group-averaged scores for the tokens before the
        window, ``+inf`` for the last ``keep_window`` tokens, ``-inf`` for any other window token.
    """
    b, kv, _, w, s = window_attention.shape
    prefix = window_attention[..., : s - w].sum(dim=3)  # (b, kv, g, S - w): summed over the window queries
    pooled = pool_tokens(prefix, kernel, pooling).mean(dim=2)  # (b, kv, S - w): pooled per query head, then averaged
    tail = pooled.new_full((b, kv, w), float("-inf"))
    tail[..., w - keep_window :] = float("inf")
    return torch.cat([pooled, tail], dim=-1)


@register_prefill("snapkv")
class SnapKV(BudgetedCompressor):
    """Keep the top ``capacity - window`` prompt tokens by windowed attention, plus the window itself.

    Defaults as in the SnapKV paper: a 32-query window, pooling kernel 7 (max). A prompt no longer than
    ``capacity`` is kept whole.
    """

    window: int = Field(32, ge=1, description="The last prompt queries whose attention scores the rest.")
    kernel: int = Field(7, ge=1, description="Pooling kernel over neighbouring tokens (odd; 1: no pooling).")
    pooling: Literal["max", "avg"] = Field("max", description="Pooling of the scores: max or avg.")

    _odd_kernel = field_validator("kernel")(staticmethod(odd_kernel))

    def window_size(self) -> int:
        return self.window

    def select(self, ctx: PrefillContext, capacity: int) -> torch.Tensor:
        """``(batch, kv_heads, capacity)`` indices; see :func:`snapkv_scores`."""
        w = ctx.window_attention.shape[3]
        scores = snapkv_scores(ctx.window_attention, self.kernel, self.pooling, min(w, capacity))
        return keep_top(scores, ctx.valid, capacity)
