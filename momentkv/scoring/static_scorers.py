"""Scorers that need no attention: position and key geometry.

- ``recency``: newer is better; alone it keeps the newest tokens, as StreamingLLM's window
  (Xiao et al., arXiv 2309.17453) does.
- ``key_norm``: a low key L2 norm predicts high attention (Devoto et al., arXiv 2406.11430, "KNorm").
"""

from __future__ import annotations

import torch

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer


@register_scorer("recency")
class Recency(Scorer):
    """``-age``: the newest token scores highest."""

    needs_attention = False
    batched_now = True
    reads_cache = False

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.age


@register_scorer("key_norm")
class KeyNorm(Scorer):
    """``-||k||``: keys of small norm draw attention and are kept."""

    needs_attention = False
    batched_now = True

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        return -torch.linalg.vector_norm(ctx.keys.float(), dim=-1)
