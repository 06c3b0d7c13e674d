"""The step at which a token was last attended to: RaaS, and LazyEviction's recurrence rule.

- RaaS (Hu et al., "Efficient Long-Decoding Inference with Reasoning-Aware Attention Sparsity", ACL
  Findings 2025, arXiv 2502.11147): a token stays while it is still being used. Each step, a token whose
  attention passes a threshold is *hit* and takes the current step as its timestamp; the token whose last hit
  is oldest is evicted (least recently used). A token's arrival counts as its first hit.
- LazyEviction (Zhang et al., arXiv 2506.15969) observed that tokens regain attention after long pauses. It
  tracks each token's recurrence intervals (the gaps between consecutive hits); with ``recurrence: true`` a
  token whose current gap is still shorter than its longest gap so far is expected back and ranks above every
  token that is overdue, which are then evicted least recently used first, as RaaS.

The threshold: ``relative: true`` measures it in units of uniform attention over the ``T`` evictable tokens
(a hit is ``a > threshold / T``), so the rule does not drift with the cache size; ``relative: false`` uses it
as an absolute attention weight, as RaaS does.

State (two channels per token): ``[0]`` the step of the last hit, ``[1]`` the longest recurrence interval.
"""

from __future__ import annotations

import torch
from pydantic import Field

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer


@register_scorer("last_hit")
class LastHit(Scorer):
    """``-(steps since the last hit)``; with ``recurrence``, tokens within their longest recurrence interval first."""

    threshold: float = Field(
        1.0, gt=0.0,
        description="Attention above which a token is hit: in units of 1/T (T evictable tokens) with relative, "
        "else an absolute weight.",
    )
    relative: bool = Field(True, description="Measure threshold in units of uniform attention 1/T (else absolute).")
    recurrence: bool = Field(
        False, description="LazyEviction: a token whose gap since its last hit is shorter than its longest gap "
        "so far ranks above every overdue token.",
    )

    state_channels = 2
    batched_now = True
    reads_cache = False

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        attention = ctx.attention  # (b, kv, T)
        tokens = attention.shape[-1]
        if ctx.valid is not None:
            tokens = ctx.valid.sum(-1, keepdim=True).clamp_min(1)
        cut = self.threshold / tokens if self.relative else self.threshold
        hit = attention > cut
        last_hit, longest_gap = ctx.state[0], ctx.state[1]
        # A new token's state is 0: its arrival is its first hit.
        torch.maximum(last_hit, ctx.positions.to(torch.float32), out=last_hit)
        batched = isinstance(ctx.now, torch.Tensor)  # (b, 1, 1): one index per row
        now = ctx.now.to(torch.float32) if batched else float(ctx.now)
        gap = now - last_hit
        longest_gap.copy_(torch.where(hit, torch.maximum(longest_gap, gap), longest_gap))
        if batched:
            last_hit.copy_(torch.where(hit, now, last_hit))
        else:
            last_hit.masked_fill_(hit, now)
        since = now - last_hit  # (b, kv, T): 0 for a token hit at this step
        if not self.recurrence:
            return -since
        expected_back = since < longest_gap
        return torch.where(expected_back, now + 1.0 - since, -since)
