"""One layer's eviction decisions over plain tensors: how many tokens go, and which.

The core of every engine. It knows the layer's :class:`~momentkv.core.plan.LayerPlan` and owns the scorers'
per-slot states (:class:`~momentkv.core.scorer_states.LayerScoring`) and the recent queries windowed scorers
read (:class:`~momentkv.core.query_window.QueryWindow`); it is handed everything else as tensors over the
layer's *evictable* slots, shaped ``(batch, kv_heads, T)`` (a :class:`~momentkv.scoring.ScoreContext`):
keys, values, absolute positions, validity, the sequence index of the newest token. It never stores keys or
values and never decides where a slot lives: the transformers cache layer hands it a view of its contiguous
slots; a paged engine gathers the slots a block table names (and keeps the states paged the same way, see
:mod:`~momentkv.core.paged`). It imports neither transformers nor any cache class.

Per decode step an engine calls, in this order: :meth:`evictions_needed` (how many slots each head frees for
the incoming token; an engine that never lets a request exceed the budget by more than one token and refuses
cadence and sliding windows may know the answer is one), :meth:`lowest` or :meth:`survivors` (which), then,
after attention, :meth:`fold` (this step's attention into the scorers' states).
"""

from __future__ import annotations

import torch

from momentkv.core import ranking
from momentkv.core.plan import LayerPlan
from momentkv.core.query_window import QueryWindow
from momentkv.core.scorer_states import LayerScoring
from momentkv.scoring.base import ScoreContext


class LayerEviction:
    """The decisions of one layer under ``plan`` (see the module docstring)."""

    def __init__(self, plan: LayerPlan):
        self.plan = plan
        self.rules = ranking.Protections(plan.sinks, plan.recent, plan.sliding_window, plan.scope == "all",
                                         plan.granularity == "layer")
        self.scoring = LayerScoring(plan.scorers if plan.budget is not None else ())
        self.window = QueryWindow(max(plan.prefill.window_size(), self.scoring.query_window))

    def evictions_needed(self, held: int, generated: int, incoming: int, active: bool,
                         positions: torch.Tensor | None = None, seen: int | None = None) -> int:
        """Slots each head must free before ``incoming`` tokens are written.

        Args:
            held: evictable tokens stored per head now.
            generated: tokens generated before these.
            active: whether the budget is enforced (``False`` when the caller knows it will not be reached).
            positions: ``(batch, kv_heads, T)`` of the evictable slots, for a sliding layer (dead tokens go).
            seen: the sequence index of the first incoming token (required with ``positions``).
        """
        plan = self.plan
        budget = plan.budget_at(generated + incoming) if active else None
        count = 0
        if budget is not None and held + incoming > budget and (
            plan.cadence == 1 or held + incoming > budget + plan.cadence - 1
        ):
            count = held + incoming - budget
        if plan.sliding_window is not None and held and positions is not None:
            if seen is None:
                raise ValueError("evictions_needed: positions of a sliding layer need seen, the incoming index")
            gone = ranking.dead(positions, seen, plan.sliding_window)
            count = max(count, int(gone.sum(-1).min()))
        return count

    def ranked(self, view: ScoreContext, prompt_tokens: int, incoming: int) -> torch.Tensor:
        """Ranking scores ``(batch, kv_heads, T)`` of the evictable slots, protections applied (see
        :mod:`~momentkv.core.ranking`), before ``incoming`` tokens at ``view.now + 1 ...`` are written."""
        total = self.scoring.total(view)
        return ranking.rank(total, view.positions, view.valid, self.rules, prompt_tokens, view.now + 1, incoming)

    def lowest(self, view: ScoreContext, prompt_tokens: int) -> torch.Tensor:
        """``(batch, kv_heads, 1)``: the slot each head gives to one incoming token."""
        return ranking.lowest(self.ranked(view, prompt_tokens, 1))

    def survivors(self, view: ScoreContext, prompt_tokens: int, incoming: int, count: int):
        """``(kept, evicted)``: the evictable slots that stay ``(batch, kv_heads, T - evicted)`` ascending, when each
        head loses its ``count`` lowest-ranked ones (fewer where protections leave fewer)."""
        return ranking.survivors(self.ranked(view, prompt_tokens, incoming), count)

    def fold(self, attention: torch.Tensor | None, view: ScoreContext) -> None:
        """Fold one decode step into the scorers: ``attention`` ``(batch, kv_heads, T)`` over the evictable slots
        (``None`` where no scorer reads it)."""
        self.scoring.step(attention, view)
