"""Scorers built on the attention each cached token receives.

- ``ema``: Moment-KV (Jana et al., arXiv 2605.29873; the same recurrence as A2SF, arXiv 2407.20485):
  ``I = alpha * I + a``. alpha = 1 is H2O's accumulated attention (Zhang et al., arXiv 2306.14048).
- ``accumulated``: H2O's sum of attention over all steps, ``I = I + a``.
- ``instantaneous``: the current step's attention only, as TOVA (Oren et al., arXiv 2401.06104) and
  SCOPE-slide (Wu et al., arXiv 2412.13649) rank tokens; with a query window, R-KV's importance
  (Cai et al., arXiv 2505.24133).
- ``peak``: G-KV's max-decay history (Liao et al., arXiv 2512.00504), ``I = max(decay * I, a)``.

Each reads ``a`` as :class:`~momentkv.scoring.observation.AttentionObservation` says: the current query's
attention after every step (the default), or a window of the last queries at each ranking step. With a
window, the window's own (fresh) tokens are scored by their observation alone and enter the history only once
the window has passed them.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from momentkv.scoring.base import ScoreContext
from momentkv.scoring.observation import AttentionObservation, field_error
from momentkv.scoring.registry import register_scorer


def _merge(state: torch.Tensor, merged: torch.Tensor, observed: torch.Tensor, fresh: torch.Tensor | None):
    """Store ``merged`` in ``state`` except at fresh tokens; return the scores (the observation at fresh ones)."""
    if fresh is None:
        state.copy_(merged)
        return state
    state.copy_(torch.where(fresh, state, merged))
    return torch.where(fresh, observed, merged)


@register_scorer("ema")
class EMA(AttentionObservation):
    """Momentum of attention: ``I = alpha * I + a`` per token and KV head.

    With ``bias_correction`` the score is ``I / (1 - alpha^(age+1))`` (Adam-style), which puts a token that
    has been attended to for ``age + 1`` steps on the same scale as an old one, so young tokens compete
    fairly; with alpha = 1 the corrected score is the mean attention ``I / (age + 1)``.
    """

    alpha: float = Field(0.9, gt=0.0, le=1.0, description="Decay of the running sum, in (0, 1]; 1 is H2O.")
    bias_correction: bool = Field(False, description="Divide by 1 - alpha^(age+1) so young tokens compete fairly.")

    @model_validator(mode="after")
    def _correction_counts_steps(self):
        if self.bias_correction and self.window > 0:
            # With a window the EMA is updated only at ranking steps, so age + 1 no longer counts its updates.
            raise field_error("bias_correction", "counts one update per decode step, so it needs window: 0, got "
                              f"window: {self.window}")
        return self

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        if self.window == 0 and self.rescale == "none" and self.kernel == 1:
            ctx.state.mul_(self.alpha).add_(ctx.attention)  # the per-step path, in place
            scores = ctx.state
        else:
            observed, fresh = self.observation(ctx)
            scores = self.finish(ctx, _merge(ctx.state, ctx.state * self.alpha + observed, observed, fresh), fresh)
        if not self.bias_correction:
            return scores
        if self.alpha == 1.0:
            return scores / (ctx.age + 1.0)
        # 1 - alpha^(age+1) = -expm1((age+1) ln alpha): exact for alpha near 1, and expm1 of a tensor is several
        # times cheaper than a scalar raised to a tensor power.
        log_alpha = math.log(self.alpha)
        return torch.div(scores, torch.add(log_alpha, ctx.age, alpha=log_alpha).expm1_()).neg_()


@register_scorer("accumulated")
class Accumulated(AttentionObservation):
    """H2O's accumulated attention: the sum of the attention a token received since it entered the cache."""

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        if self.window == 0 and self.rescale == "none" and self.kernel == 1:
            return ctx.state.add_(ctx.attention)
        observed, fresh = self.observation(ctx)
        return self.finish(ctx, _merge(ctx.state, ctx.state + observed, observed, fresh), fresh)


@register_scorer("instantaneous")
class Instantaneous(AttentionObservation):
    """The attention of the current query alone (TOVA; SCOPE's slide variant), or of the last ``window``
    queries (R-KV's importance: ``window: 8, group: max, kernel: 7``)."""

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        if self.window == 0 and self.rescale == "none" and self.kernel == 1:
            return ctx.attention
        observed, fresh = self.observation(ctx)
        return self.finish(ctx, observed, fresh)


@register_scorer("peak")
class Peak(AttentionObservation):
    """G-KV's history: ``I = max(decay * I, a)``, the strongest attention a token received, decaying.

    G-KV (arXiv 2512.00504) merges each compression's windowed observation (rescaled by its maximum) this way
    by default; with ``window: 0`` it runs every step on the current query's attention.
    """

    decay: float = Field(0.8, gt=0.0, le=1.0, description="Decay of the remembered peak per update, in (0, 1].")

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        observed, fresh = self.observation(ctx)
        merged = torch.maximum(ctx.state * self.decay, observed)
        return self.finish(ctx, _merge(ctx.state, merged, observed, fresh), fresh)
