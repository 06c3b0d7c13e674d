"""The every-step scoring of one layer as one function of plain tensors, for the steady state.

Once a layer's budget is full, every decode step does the same work on tensors of one fixed shape
``(batch, kv_heads, T)``, ``T`` the budget: fold this step's attention into the scorers' states, apply the
bias correction, normalise, sum, protect the sinks and the recent tokens, and name each head's lowest-ranked
slot, the one the next token will take. :class:`LayerScoring` and :mod:`~momentkv.core.ranking` do this in
about 20 tensor operations spread over Python objects (the scorers, the score record, the protections); here
the same arithmetic, in the same order, is one function of tensors (:meth:`FusedStep.__call__`), which

- run eagerly gives bit for bit the same states, total and victim as the general path (the tests compare them);
- is what :mod:`~momentkv.core.compiled` hands to ``torch.compile`` (one compiled computation per shape);
- is what a compiled decode step traces, with no Python object in the way.

Only the built-in scorers whose every-step work is a closed formula take this path (:func:`fused_spec` says
which: ``ema``, ``accumulated`` and ``instantaneous`` without windows, rescaling or pooling, and ``recency``),
with ``cadence: 1``, ``granularity: head``, ``scope: decode`` and no sliding window; any other plan keeps the
general path, unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from momentkv.core import ranking
from momentkv.core.plan import LayerPlan
from momentkv.scoring.normalize import normalize_scores

# (kind, alpha, bias_correction, normalize, weight): one scorer, reduced to constants.
_Part = tuple[str, float, bool, str, float]
_NORMALIZATIONS = ("none", "sum", "max", "zscore", "rank")


@dataclass(frozen=True)
class FusedSpec:
    """A layer's every-step scoring and protections, as constants (equal specs share one compiled function).

    ``parts``: one entry per scorer, in policy order: ``(kind, alpha, bias_correction, normalize, weight)``
    with ``kind`` one of ``ema``, ``accumulated``, ``instantaneous``, ``recency``.
    """

    parts: tuple[_Part, ...]
    sinks: int
    recent: int
    budget: int

    @property
    def stateful(self) -> tuple[int, ...]:
        """Indices of the parts that keep a state (``ema``, ``accumulated``)."""
        return tuple(i for i, p in enumerate(self.parts) if p[0] in ("ema", "accumulated"))

    @property
    def needs_attention(self) -> bool:
        return any(p[0] != "recency" for p in self.parts)


def _part_of(scorer) -> _Part | None:
    """The constants of a built-in scorer whose every-step update is a closed formula, else ``None``."""
    from momentkv.scoring.attention_scorers import EMA, Accumulated, Instantaneous
    from momentkv.scoring.static_scorers import Recency

    kind = {EMA: "ema", Accumulated: "accumulated", Instantaneous: "instantaneous", Recency: "recency"}.get(
        type(scorer))  # exact types: a subclass may change update()
    if kind is None or scorer.normalize not in _NORMALIZATIONS:
        return None
    if kind != "recency" and (scorer.window != 0 or scorer.rescale != "none" or scorer.kernel != 1):
        return None
    alpha = float(getattr(scorer, "alpha", 1.0))
    return kind, alpha, bool(getattr(scorer, "bias_correction", False)), scorer.normalize, float(scorer.weight)


def fused_spec(plan: LayerPlan) -> FusedSpec | None:
    """The :class:`FusedSpec` of ``plan``, or ``None`` where the steady state is not one closed computation."""
    if not isinstance(plan.budget, int) or plan.cadence != 1 or plan.granularity != "head":
        return None
    if plan.scope != "decode" or plan.sliding_window is not None or not plan.scorers:
        return None
    parts = tuple(_part_of(s) for s in plan.scorers)
    if any(p is None for p in parts):
        return None
    return FusedSpec(parts, plan.sinks, plan.recent, plan.budget)


def _rank_steps(t: int, like: torch.Tensor) -> torch.Tensor:
    """``0, 1/(T-1), ..., 1``: made once per length eagerly, computed in the graph when compiling."""
    if torch.compiler.is_compiling():
        return torch.arange(t, device=like.device, dtype=torch.float32).div_(max(t - 1, 1))
    return _cached_rank_steps(t, like.device)


@functools.lru_cache(maxsize=64)
def _cached_rank_steps(t: int, device: torch.device) -> torch.Tensor:
    return torch.arange(t, device=device, dtype=torch.float32).div_(max(t - 1, 1))


def _ranks(outputs: list[torch.Tensor]) -> torch.Tensor:
    """``(k, b, h, T)`` ranks in ``[0, 1]`` of ``k`` outputs ``(b, h, T)``, one stable sort over them stacked
    (as :func:`momentkv.scoring.normalize.rank_of` and ``_rank_sum`` compute them)."""
    stacked = outputs[0].unsqueeze(0) if len(outputs) == 1 else torch.stack(outputs)
    order = stacked.argsort(dim=-1, stable=True)
    out = torch.empty(stacked.shape, dtype=torch.float32, device=stacked.device)
    return out.scatter_(-1, order, _rank_steps(stacked.shape[-1], stacked).expand(stacked.shape))


class FusedStep:
    """One layer's steady-state step under a :class:`FusedSpec` (see the module docstring)."""

    def __init__(self, spec: FusedSpec):
        self.spec = spec
        self.rules = ranking.Protections(spec.sinks, spec.recent, None, False, False)

    def __call__(self, states: list[torch.Tensor], attention: torch.Tensor | None, positions: torch.Tensor,
                 now: int | torch.Tensor, prompt_tokens: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold one step and rank for the next.

        Args:
            states: the stateful parts' float32 states ``(batch, kv_heads, T)``, in :attr:`FusedSpec.stateful`
                order; updated in place.
            attention: ``(batch, kv_heads, T)`` float32, this step's attention over the evictable slots
                (``None`` when no part reads it).
            positions: ``(batch, kv_heads, T)`` int64 sequence indices of the evictable slots.
            now: the sequence index of the newest token (written at this step): an int, or a 0-d int64 tensor
                (what a compiled call takes, so that a new step is not a new constant to compile for).
            prompt_tokens: the length of the first prompt (sinks follow it): an int or a 0-d int64 tensor.

        Returns ``(total, victim)``: the ranking score ``(batch, kv_heads, T)`` float32 (the weighted sum of the
        normalised outputs, what ``LayerScoring.step_total`` holds) and ``(batch, kv_heads, 1)`` int64, each
        head's lowest-ranked slot before the next token (at ``now + 1``) is written, protections applied.
        """
        spec = self.spec
        age = (now - positions).to(torch.float32)
        outputs, state_iter = [], iter(states)
        for kind, alpha, corrected, _, _ in spec.parts:
            if kind == "recency":
                outputs.append(-age)
                continue
            if kind == "instantaneous":
                outputs.append(attention)
                continue
            state = next(state_iter)
            scores = state.mul_(alpha).add_(attention) if kind == "ema" else state.add_(attention)
            if kind == "ema" and corrected:
                if alpha == 1.0:
                    scores = scores / (age + 1.0)
                else:
                    log_alpha = math.log(alpha)
                    scores = torch.div(scores, torch.add(log_alpha, age, alpha=log_alpha).expm1_()).neg_()
            outputs.append(scores)
        total = None
        ranked = [(o, p[4]) for o, p in zip(outputs, spec.parts) if p[3] == "rank"]
        for out, (_, _, _, how, weight) in zip(outputs, spec.parts):
            if how == "rank":
                continue
            out = normalize_scores(out, how)  # never rank here: the ranked ones are summed below
            if weight != 1.0:
                out = out * weight
            total = out if total is None else total + out
        if ranked:
            ranks = _ranks([o if o.dtype == torch.float32 else o.float() for o, _ in ranked])
            if len(ranked) == 1:
                rank_sum = ranks[0] if ranked[0][1] == 1.0 else ranks[0].mul_(ranked[0][1])
            else:
                for row, (_, weight) in zip(ranks, ranked):
                    if weight != 1.0:
                        row.mul_(weight)
                rank_sum = ranks.sum(dim=0)
            total = rank_sum if total is None else total + rank_sum
        return total, self.victim(total, positions, now, prompt_tokens)

    def victim(self, total: torch.Tensor, positions: torch.Tensor, now: int | torch.Tensor,
               prompt_tokens: int | torch.Tensor) -> torch.Tensor:
        """``(b, h, 1)``: each head's lowest-ranked slot for one token arriving at ``now + 1``: the protections
        and the choice of :mod:`~momentkv.core.ranking` itself, given tensors or ints alike."""
        ranked = ranking.rank(total, positions, None, self.rules, prompt_tokens, now + 1, 1)
        return ranking.lowest(ranked)
