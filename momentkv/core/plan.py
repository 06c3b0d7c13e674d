"""A policy resolved for one layer of one model: the plain facts the cache layer acts on."""

from __future__ import annotations

from dataclasses import dataclass, field

from momentkv.policy.schema import Policy, RatioBudget
from momentkv.prefill.base import KeepAll, PrefillCompressor
from momentkv.scoring import Scorer


@dataclass(frozen=True)
class LayerPlan:
    """What one cache layer does.

    ``budget`` is ``None`` for a layer that keeps every generated token (no decode policy, or a layer the
    policy leaves uncompressed).
    """

    layer_idx: int
    num_layers: int
    budget: int | RatioBudget | None
    sinks: int = 0
    recent: int = 0
    cadence: int = 1
    granularity: str = "head"
    scope: str = "decode"
    scorers: tuple[Scorer, ...] = ()
    prefill: PrefillCompressor = KeepAll()
    sliding_window: int | None = None
    #: Whether each decode step must compute the attention of its query for this layer's scorers (the scorers
    #: that read attention and no window of queries; a windowed scorer recomputes its own). Computed at
    #: construction: a lazily cached property takes a lock on first use, which a compiled step cannot trace.
    needs_step_attention: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        needs = self.budget is not None and any(s.needs_attention and s.query_window() == 0 for s in self.scorers)
        object.__setattr__(self, "needs_step_attention", needs)

    def budget_at(self, generated: int) -> int | None:
        """The budget in tokens once ``generated`` tokens have been generated (``None``: unbounded)."""
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        return self.budget.budget_at(generated)


def build_plans(policy: Policy, num_layers: int, sliding_windows: list[int | None]) -> list[LayerPlan]:
    """Resolve ``policy`` for each of ``num_layers`` layers."""
    plans = []
    for idx in range(num_layers):
        decode = policy.decode
        common = dict(layer_idx=idx, num_layers=num_layers, prefill=policy.prefill, sliding_window=sliding_windows[idx])
        if decode is None or idx in decode.uncompressed_layers:
            plans.append(LayerPlan(budget=None, **common))
            continue
        budget = decode.budget_for_layer(idx, num_layers)
        sinks, recent = decode.protections_for(budget)
        plans.append(
            LayerPlan(
                budget=budget,
                sinks=sinks,
                recent=recent,
                cadence=decode.cadence,
                granularity=decode.granularity,
                scope=decode.scope,
                scorers=tuple(decode.scorers),
                **common,
            )
        )
    return plans
