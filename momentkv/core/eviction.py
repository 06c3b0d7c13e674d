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

In the steady state of a plan whose every-step scoring is one closed computation (a full budget of fixed
shape; :mod:`~momentkv.core.fused_scoring`), :meth:`fold` runs it as one computation, which also names the
slot each head gives to the next token: the next :meth:`lowest` returns it without ranking again. On the CPU
that computation is one native call (:mod:`~momentkv.core.native_scoring`; results equal to the general path's
up to rounding), elsewhere, or where no compiler builds it, one function of tensors (bit for bit the general
path), which ``MOMENTKV_COMPILE_SCORING=1`` compiles with inductor (:mod:`~momentkv.core.compiled`).
"""

from __future__ import annotations

import torch

from momentkv.core import ranking
from momentkv.core.compiled import CompiledStep, enabled as compile_enabled
from momentkv.core.fused_scoring import FusedSpec, FusedStep, fused_spec
from momentkv.core.plan import LayerPlan
from momentkv.core.query_window import QueryWindow
from momentkv.core.scorer_states import LayerScoring
from momentkv.core import native_scoring
from momentkv.scoring.base import ScoreContext

_FUSED: dict[FusedSpec, tuple[FusedStep, CompiledStep]] = {}  # layers with equal specs share one compiled step
_NATIVE: dict[FusedSpec, native_scoring.NativeStep | None] = {}  # built on the first steady CPU step that needs one


def _native_for(spec: FusedSpec) -> native_scoring.NativeStep | None:
    if not native_scoring.enabled():
        return None
    if spec not in _NATIVE:
        _NATIVE[spec] = native_scoring.native_step(spec)
    return _NATIVE[spec]


def _fused_for(spec: FusedSpec) -> tuple[FusedStep, CompiledStep]:
    pair = _FUSED.get(spec)
    if pair is None:
        step = FusedStep(spec)
        pair = _FUSED[spec] = (step, CompiledStep(step, "fused_scoring"))
    return pair


class LayerEviction:
    """The decisions of one layer under ``plan`` (see the module docstring)."""

    def __init__(self, plan: LayerPlan):
        self.plan = plan
        self.rules = ranking.Protections(plan.sinks, plan.recent, plan.sliding_window, plan.scope == "all",
                                         plan.granularity == "layer")
        self.scoring = LayerScoring(plan.scorers if plan.budget is not None else ())
        self.window = QueryWindow(max(plan.prefill.window_size(), self.scoring.query_window))
        spec = None if self.scoring.debug else fused_spec(plan)
        self.fused = None if spec is None else _fused_for(spec)
        # The shared step's own spec: equal specs of other caches are then the same object, which a compiled
        # step guards on (an equal but distinct one would compile the step again for every new cache).
        self.spec = None if spec is None else self.fused[0].spec
        self._next: tuple | None = None  # (view, victim): what the last fused fold named for the next token
        self._prompt: tuple[int, torch.Tensor] | None = None  # the prompt length, as an int and a 0-d tensor

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
        named, self._next = self._next, None
        if named is not None and named[0] is view:
            # The fold of the step before ranked these very slots: the view is the same object only while no
            # slot tensor was replaced, and a layer asks for the lowest slot right after the step it folded.
            return named[1]
        return ranking.lowest(self.ranked(view, prompt_tokens, 1))

    def survivors(self, view: ScoreContext, prompt_tokens: int, incoming: int, count: int):
        """``(kept, evicted)``: the evictable slots that stay ``(batch, kv_heads, T - evicted)`` ascending, when each
        head loses its ``count`` lowest-ranked ones (fewer where protections leave fewer)."""
        return ranking.survivors(self.ranked(view, prompt_tokens, incoming), count)

    def fold(self, attention: torch.Tensor | None, view: ScoreContext,
             prompt_tokens: int | torch.Tensor | None = None) -> None:
        """Fold one decode step into the scorers: ``attention`` ``(batch, kv_heads, T)`` over the evictable slots
        (``None`` where no scorer reads it). Given ``prompt_tokens`` and a full budget, a fused plan folds and
        ranks in one computation (see the module docstring), which :meth:`named_victim` then returns.
        ``prompt_tokens`` is an int, or a ``(batch, 1, 1)`` tensor when the batch rows' ``view.now`` is one too
        (a paged engine's rows stand at different steps)."""
        self._next = None
        spec, scoring = self.spec, self.scoring
        if (spec is None or prompt_tokens is None or not scoring.started or view.positions.shape[-1] != spec.budget
                or (attention is None and spec.needs_attention)):
            scoring.step(attention, view)
            return
        step, compiled = self.fused
        states = [scoring.states[i] for i in spec.stateful]
        device = view.positions.device
        if torch.compiler.is_compiling():
            total, victim = step(states, attention, view.positions, view.now, prompt_tokens)
        elif compile_enabled(device) and not isinstance(view.now, torch.Tensor):
            # the step and the prompt as tensors: new data, not new constants
            now = torch.tensor(view.now, device=device)
            total, victim = compiled(states, attention, view.positions, now, self._prompt_tensor(prompt_tokens, device))
        else:
            native = _native_for(spec) if device.type == "cpu" else None
            result = None if native is None else native(states, attention, view.positions, view.now, prompt_tokens)
            total, victim = result if result is not None else step(states, attention, view.positions, view.now,
                                                                   prompt_tokens)
        scoring.attention, scoring.step_total = attention, total
        self._next = (view, victim)

    def fold_in_place(self, attention: torch.Tensor | None, states: list[torch.Tensor], total: torch.Tensor,
                      positions: torch.Tensor, index: torch.Tensor, now, prompt_tokens) -> torch.Tensor | None:
        """The steady fold of :meth:`fold` on a paged engine's per-slot pools, natively and in place: ``states``
        (the pools of the spec's stateful scorers), ``total`` and ``positions`` ``(num_slots, kv_heads)``, the
        batch's evictable slots at flat cells ``index`` ``(batch, kv_heads, budget)``. Returns the victims
        ``(batch, kv_heads, 1)`` for the next token, or ``None`` with nothing changed where this plan has no native
        steady step (the caller then gathers the states and calls :meth:`fold`). The pools hold every slot's state
        from the start (zero for a new token), so, unlike :meth:`fold`, there is no first load to wait for; the
        cells of ``index`` must be distinct (rows are folded in parallel)."""
        spec = self.spec
        if (spec is None or index.shape[-1] != spec.budget or positions.device.type != "cpu"
                or torch.compiler.is_compiling()
                or (compile_enabled(positions.device) and not isinstance(now, torch.Tensor))  # as fold decides
                or (attention is None and spec.needs_attention)):
            return None
        native = _native_for(spec)
        if native is None:
            return None
        self._next = None
        return native.paged(states, total, positions, index, attention, now, prompt_tokens)

    def named_victim(self, view: ScoreContext) -> torch.Tensor | None:
        """``(batch, kv_heads, 1)``: the slot each head gives to the next token, as the last :meth:`fold` of
        ``view`` named it in its fused step (what :meth:`lowest` would return for this view), else ``None``."""
        named = self._next
        return named[1] if named is not None and named[0] is view else None

    def _prompt_tensor(self, prompt_tokens: int, device) -> torch.Tensor:
        if self._prompt is None or self._prompt[0] != prompt_tokens:
            self._prompt = (prompt_tokens, torch.tensor(prompt_tokens, device=device))
        return self._prompt[1]
