"""Scorers built on the attention each cached token receives.

- ``ema``: Moment-KV (Jana et al., arXiv 2605.29873; the same recurrence as A2SF, arXiv 2407.20485):
  ``I = alpha * I + a``. alpha = 1 is H2O's accumulated attention (Zhang et al., arXiv 2306.14048).
- ``accumulated``: H2O's sum of attention over all steps, ``I = I + a``.
- ``instantaneous``: the current step's attention only, as TOVA (Oren et al., arXiv 2401.06104) and
  SCOPE-slide (Wu et al., arXiv 2412.13649) rank tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer


@register_scorer("ema")
class EMA(Scorer):
    """Momentum of attention: ``I = alpha * I + a`` per token and KV head.

    With ``bias_correction`` the score is ``I / (1 - alpha^(age+1))`` (Adam-style), which puts a token that
    has been attended to for ``age + 1`` steps on the same scale as an old one, so young tokens compete
    fairly; with alpha = 1 the corrected score is the mean attention ``I / (age + 1)``.
    """

    alpha: float = Field(0.9, gt=0.0, le=1.0, description="Decay of the running sum, in (0, 1]; 1 is H2O.")
    bias_correction: bool = Field(False, description="Divide by 1 - alpha^(age+1) so young tokens compete fairly.")

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.state.mul_(self.alpha).add_(ctx.attention)
        if not self.bias_correction:
            return ctx.state
        if self.alpha == 1.0:
            return ctx.state / (ctx.age + 1.0)
        return ctx.state / (1.0 - torch.pow(self.alpha, ctx.age + 1.0))


@register_scorer("accumulated")
class Accumulated(Scorer):
    """H2O's accumulated attention: the sum of the attention a token received since it entered the cache."""

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.state.add_(ctx.attention)


@register_scorer("instantaneous")
class Instantaneous(Scorer):
    """The attention of the current query alone (TOVA; SCOPE's slide variant)."""

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.attention
