"""KeyDiff: keep the keys least like the others (Park et al., arXiv 2504.15364).

Distinctive keys tend to draw attention. KeyDiff scores each token by ``-cos(k_i, anchor)``, where the
anchor is the mean of the normalised keys, ``O(n d)`` per (batch row, KV head) and no attention needed.
Here the anchor is the mean over the layer's evictable tokens (KeyDiff, a method for long prompts processed
block by block, takes it over the cache it is filling).
"""

from __future__ import annotations

import torch

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer


@register_scorer("keydiff")
class KeyDiff(Scorer):
    """``-cos(k, mean of the normalised keys)``: the more distinctive a key, the higher its score."""

    needs_attention = False
    batched_now = True

    def every_step(self) -> bool:
        return False

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        keys = ctx.keys.float()
        unit = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min(1e-8)  # (b, kv, n, d)
        if ctx.valid is None:
            anchor = unit.mean(dim=-2, keepdim=True)  # (b, kv, 1, d)
        else:
            weights = ctx.valid.unsqueeze(-1).float()
            anchor = (unit * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1.0)
        norm = torch.linalg.vector_norm(anchor, dim=-1).clamp_min(1e-8)  # (b, kv, 1)
        return -(unit * anchor).sum(-1) / norm
