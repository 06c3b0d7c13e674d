"""The scorers of one cache layer: their states, the scores they give, and when they run.

Everything the per-step path needs is resolved once, when the layer is built: each scorer's bound ``update``,
its normalisation, its weight, its state shape, and whether it runs after every decode step or only when the
layer ranks its tokens (``Scorer.every_step``). States are float32 ``(batch, kv_heads, T)`` (or
``(channels, batch, kv_heads, T)``) over the layer's ``T`` evictable slots; they move with the slots.

The ranking score is the weighted sum of the normalised outputs: the every-step scorers' part is kept from
the last step, the rank-time scorers' part is computed when the layer asks (:meth:`LayerScoring.total`).
"""

from __future__ import annotations

import os
import torch

from momentkv.errors import PolicyError
from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.normalize import normalize_scores, rank_of

DEBUG_ENV = "MOMENTKV_DEBUG"


def _add_weighted(total: torch.Tensor | None, out: torch.Tensor, weight: float) -> torch.Tensor:
    if weight != 1.0:
        out = out * weight
    return out if total is None else total + out


def _rank_sum(ranked: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """The weighted sum of the ranks of outputs ``(batch, kv_heads, T)``: several are ranked in one sort over
    them stacked (one sort of ``k`` rows costs little more than one, where ``k`` sorts cost ``k`` dispatches)."""
    if len(ranked) == 1:
        out, weight = ranked[0]
        ranks = rank_of(out)
        return ranks if weight == 1.0 else ranks.mul_(weight)
    ranks = rank_of(torch.stack([o if o.dtype == torch.float32 else o.float() for o, _ in ranked]))  # (k, b, h, T)
    for row, (_, weight) in zip(ranks, ranked):
        if weight != 1.0:
            row.mul_(weight)
    return ranks.sum(dim=0)


class _Component:
    """One scorer, resolved for the per-step path."""

    __slots__ = ("scorer", "update", "normalize", "weight", "channels")

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.update = scorer.update
        self.normalize = scorer.normalize
        self.weight = float(scorer.weight)
        self.channels = int(scorer.state_channels)


class LayerScoring:
    """Scorer states and scores of one layer (see the module docstring)."""

    def __init__(self, scorers: tuple[Scorer, ...]):
        parts = [_Component(s) for s in scorers]
        self.components = parts
        self.each_step = [i for i, p in enumerate(parts) if p.scorer.every_step()]
        self.at_rank = [i for i, p in enumerate(parts) if not p.scorer.every_step()]
        self.query_window = max((s.query_window() for s in scorers), default=0)
        self.debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0")  # read once per layer
        self.states: list[torch.Tensor] = []
        self._step_total: torch.Tensor | None = None  # the every-step scorers' part, from the last step
        self._pending: list | None = None  # the last step's outputs, not yet normalised and summed
        self.attention: torch.Tensor | None = None  # the last step's attention, for rank-time scorers
        self.started = False

    # ----------------------------------------------------------------- slots
    def start(self, batch: int, heads: int, tokens: int, device) -> None:
        """Zero states for ``tokens`` evictable slots (called when the prompt is complete)."""
        self.states = [self._zeros(p.channels, batch, heads, tokens, device) for p in self.components]
        self.started = True

    @staticmethod
    def _zeros(channels: int, b: int, h: int, t: int, device) -> torch.Tensor:
        shape = (b, h, t) if channels == 1 else (channels, b, h, t)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def append(self, count: int) -> None:
        """``count`` new evictable slots at the end, their states zero."""
        if not self.started:
            return
        self.states = [torch.cat([s, s.new_zeros((*s.shape[:-1], count))], dim=-1) for s in self.states]
        self.step_total = self.attention = None

    def reset_slot(self, slot: torch.Tensor) -> None:
        """A new token took slot ``slot`` ``(b, h, 1)`` of each head: its states start at zero."""
        for state in self.states:
            state.scatter_(-1, slot if state.dim() == 3 else slot.expand(*state.shape[:-1], 1), 0.0)

    def keep(self, index: torch.Tensor) -> None:
        """Keep the evictable slots ``index`` ``(b, h, n)``, in that order."""
        self.states = [s.gather(-1, index.expand(*s.shape[:-1], index.shape[-1])) for s in self.states]
        self.step_total = self.attention = None

    def select_rows(self, pick) -> None:
        def rows(t: torch.Tensor) -> torch.Tensor:
            return pick(t) if t.dim() == 3 else pick(t.transpose(0, 1)).transpose(0, 1).contiguous()

        self.states = [rows(s) for s in self.states]
        self.step_total = None if self.step_total is None else pick(self.step_total)
        self.attention = None if self.attention is None else pick(self.attention)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states) + (0 if self._step_total is None else self._step_total.nbytes)

    # ----------------------------------------------------------------- scoring
    def _outputs(self, which: list[int], attention, ctx: ScoreContext) -> list[tuple[_Component, torch.Tensor]]:
        """Run the scorers ``which`` on ``ctx`` (one record: each scorer sees its own state in it, and the age is
        computed once, by the first scorer that reads it); their states update in place. Check each output."""
        outputs = []
        expected = tuple(ctx.positions.shape)
        ctx.attention = attention
        for i in which:
            part = self.components[i]
            ctx.state = self.states[i]
            out = part.update(ctx)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise PolicyError(
                    f"scorer {part.scorer.type!r} returned {got}; a scorer returns one score per evictable "
                    f"token, shaped (batch, kv_heads, tokens) = {expected}"
                )
            if self.debug and not bool(torch.isfinite(out).all()):
                raise PolicyError(
                    f"scorer {part.scorer.type!r} returned a NaN or infinite score at layer {ctx.layer_idx} "
                    f"(step {ctx.now}); scores must be finite ({DEBUG_ENV}=1 checks this every step)"
                )
            outputs.append((part, out))
        ctx.state = ctx.attention = None  # the record outlives the step: hold no state or attention
        return outputs

    @staticmethod
    def _combine(outputs: list[tuple[_Component, torch.Tensor]]) -> torch.Tensor | None:
        """The weighted sum of the normalised outputs; the rank-normalised ones are ranked in one sort."""
        total = None
        ranked: list[tuple[torch.Tensor, float]] = []
        for part, out in outputs:
            if part.normalize == "rank":
                ranked.append((out, part.weight))
                continue
            if part.normalize != "none":
                out = normalize_scores(out, part.normalize)
            total = _add_weighted(total, out, part.weight)
        if ranked:
            total = _add_weighted(total, _rank_sum(ranked), 1.0)
        return total

    def step(self, attention: torch.Tensor | None, ctx: ScoreContext) -> None:
        """Fold one decode step into the every-step scorers; keep ``attention`` for the rank-time ones.

        The states update now; their normalisation and sum wait until :attr:`step_total` is read (at the next
        ranking), so that with ``cadence: k`` the rank normalisation runs once per ``k`` steps, not every step.
        """
        self.attention = attention
        self._pending = self._outputs(self.each_step, attention, ctx) if self.each_step else None
        self._step_total = None

    @property
    def step_total(self) -> torch.Tensor | None:
        """The every-step scorers' part of the ranking score ``(batch, kv_heads, T)``, from the last step."""
        if self._pending is not None:
            self._step_total, self._pending = self._combine(self._pending), None
        return self._step_total

    @step_total.setter
    def step_total(self, value: torch.Tensor | None) -> None:
        self._step_total, self._pending = value, None

    def total(self, ctx: ScoreContext) -> torch.Tensor:
        """The ranking score ``(batch, kv_heads, T)``: every-step part plus the rank-time scorers run now."""
        total = self.step_total
        if self.at_rank:
            late = self._combine(self._outputs(self.at_rank, self.attention, ctx))
            total = late if total is None else total + late
        if total is None:  # no scorer has run yet (or none exists): every slot ties
            total = torch.zeros(ctx.positions.shape, dtype=torch.float32, device=ctx.positions.device)
        return total
