"""The evicting cache layer: transformers' cache-layer interface over the eviction core.

The layer is an adapter. Its parts each own their state: :class:`~momentkv.engine.slots.Slots` (keys, values,
positions, validity, in contiguous slots per row), :class:`~momentkv.engine.context.Context` (context chunks
and their compression) and :class:`~momentkv.core.eviction.LayerEviction`, the engine-agnostic core (scorer
states, protections, victims). With ``scope: decode`` the slots are ``[context | generated]``: context (the
prompt and any later multi-token chunk, such as a new user turn) fills the leading slots and is never
evicted at decode time; generated tokens (fed one at a time) follow and are evictable. With ``scope: all``
every slot is evictable.

One decode step, per layer, top to bottom:

1. ``update`` (the attention module calls it through the cache): when the budget is full the core names the
   lowest-ranked slot of each head and the new token is written into it (no reallocation); ``update`` leaves
   a :class:`~momentkv.engine.step.StepRecord` in the attention kwargs saying whether this step's attention
   is needed.
2. The attention function asks :meth:`EvictingLayer.step_mask` for the mask, computes the output (and, when
   the record says so, the attention of the query in the same pass).
3. It hands the step back once, :meth:`EvictingLayer.observe`, which folds the attention into the scorers.

The token written at a step is never the one evicted at that step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from momentkv.core.eviction import LayerEviction
from momentkv.core.group_attention import group_attention
from momentkv.core.plan import LayerPlan
from momentkv.engine import masks
from momentkv.engine.context import Context
from momentkv.engine.slots import Slots
from momentkv.engine.step import STEP_KWARG, StepRecord
from momentkv.errors import PolicyError
from momentkv.scoring.base import ScoreContext


class EvictingLayer(CacheLayerMixin):
    """One layer's KV cache under a :class:`~momentkv.core.plan.LayerPlan` (see the module docstring)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        self.slots = Slots()
        super().__init__()
        self.plan = plan
        self.is_sliding = plan.sliding_window is not None  # read by transformers' Cache
        self.eviction = LayerEviction(plan)
        self.context = Context(plan, self.slots, self.eviction.scoring, self.eviction.window)
        self.active = plan.budget is not None  # False: this cache will not reach the budget (see ``expect``)
        self.seen = 0  # tokens fed through this layer
        self.generated = 0  # tokens fed one at a time
        self.evicted = 0  # tokens evicted per (batch row, KV head)
        self.peak_slots = 0
        self.step: StepRecord | None = None  # what the last ``update`` decided
        self._decode_step = StepRecord(self, context=False)  # reused every decode step (it holds no chunk)
        self._scores_pending = False  # a token was written and its step's attention not yet folded in
        self._view: tuple | None = None  # (slot version, fixed slots) and the ScoreContext made for them

    # ----------------------------------------------------------------- the parts, read-only
    keys = property(lambda self: self.slots.keys, lambda self, v: setattr(self.slots, "keys", v))
    values = property(lambda self: self.slots.values, lambda self, v: setattr(self.slots, "values", v))
    positions = property(lambda self: self.slots.positions, doc="``(batch, kv_heads, S)`` sequence indices.")
    valid = property(lambda self: self.slots.valid, doc="``(batch, kv_heads, S)`` bool, or None: no padding.")
    stored = property(lambda self: self.slots.stored, doc="Slots per (batch row, KV head).")
    first_evictable = property(lambda self: self.slots.fixed, doc="Leading slots decode eviction never touches.")
    context_slots = property(lambda self: self.slots.fixed, doc="Leading slots holding context (scope: decode).")
    scoring = property(lambda self: self.eviction.scoring, doc="The scorers' states (the core's).")
    window = property(lambda self: self.eviction.window, doc="The recent queries windowed parts read.")
    scores = property(lambda self: self.eviction.scoring.step_total, doc="The every-step scorers' last score.")
    prompt_tokens = property(lambda self: self.context.prompt_tokens, doc="Length of the first prompt.")
    in_context = property(lambda self: self.context.in_context, doc="The last tokens fed were context.")

    # ----------------------------------------------------------------- 1. update
    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        """Store ``key_states``/``value_states`` ``(batch, kv_heads, q, head_dim)``; return the whole layer.

        ``kwargs`` is the dict the attention module later unpacks into the attention function: this step's
        record goes there (see :mod:`~momentkv.engine.step`).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.context.takes(self.seen, q):
            chunk = self.context.receive(key_states, value_states, self.seen, self.generated)
            self.seen += q
            self.step = StepRecord(self, context=True, chunk=chunk)
        else:
            if self.context.in_context:
                self._finish_context()
            elif self._scores_pending:
                raise PolicyError(
                    f"layer {self.plan.layer_idx}: the attention of the last step never reached this cache, so its "
                    "scores would go stale; use the cache with a model patched by momentkv.patch() (its attention "
                    "function reports to the cache) on transformers >= 5.24"
                )
            self._receive_generated(key_states, value_states)
            step = self.step = self._decode_step
            step.needs_attention = self.active and q == 1 and self.plan.needs_step_attention
        if kwargs is not None:
            kwargs[STEP_KWARG] = self.step
        self.peak_slots = max(self.peak_slots, self.stored)
        return self.keys, self.values

    def expect(self, context_end: int, max_new_tokens: int | None = None) -> None:
        """Tokens before ``context_end`` are context; at most ``max_new_tokens`` follow (see ``EvictingCache``)."""
        self.context.end = context_end
        if self.plan.budget is None or max_new_tokens is None:
            self.active = self.plan.budget is not None
            return
        later_context = max(context_end - self.seen, 0) if self.plan.scope == "all" else 0
        held = self.slots.evictable_count + later_context + max_new_tokens
        reached = held > self.plan.budget_at(self.generated + max_new_tokens)
        self.active = reached or (self.active and self.generated > 0)  # scoring, once begun, never stops

    def fixed_shape(self) -> bool:
        """Whether the next single-token step keeps every tensor's shape and layout: the budget (a fixed integer,
        ranked every step, no sliding window) is full and enforced, so the new token takes an evicted slot, and
        the slots' positions are stored (the first eviction stores them; before it they are a broadcast view)."""
        plan = self.plan
        return (self.active and self.generated > 0 and isinstance(plan.budget, int) and plan.cadence == 1
                and plan.sliding_window is None and self.slots.evictable_count == plan.budget
                and not self.slots.in_order)

    def _finish_context(self) -> None:
        """The context is complete: compress it, then score from the next decode step on."""
        self.context.finish()
        if not self.scoring.started:
            b, h, s = self.positions.shape
            self.scoring.start(b, h, s - self.slots.fixed, self.device)
        if self.plan.scope == "all" and self.active:
            # Context tokens enter the ranking as if the last context query were a decode step: each scorer
            # folds in the attention that query gave them (TOVA's ranking of the prompt).
            self.update_scores(self.context.last_attention if self.plan.needs_step_attention else None)
        self.context.last_attention = None

    def _receive_generated(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.is_sliding and self.plan.scope == "decode":
            self.context.drop_dead(self.seen)
        q, slots = key_states.shape[-2], self.slots
        sliding = self.positions[..., slots.fixed :] if self.is_sliding else None
        count = self.eviction.evictions_needed(slots.evictable_count, self.generated, q, self.active, sliding,
                                               self.seen)
        if count == 1 and q == 1:  # steady state: the new token takes each head's lowest-ranked slot
            slot = self.eviction.lowest(self._score_view(), self.context.prompt_tokens)
            slots.write_evictable(slot, key_states, value_states, self.seen)
            self.eviction.scoring.reset_slot(slot)
            self.evicted += 1
        else:
            if count:
                kept, evicted = self.eviction.survivors(self._score_view(), self.context.prompt_tokens, q, count)
                slots.keep_evictable(kept)
                self.scoring.keep(kept)
                self.evicted += evicted
            slots.insert(self.stored, key_states, value_states, self.seen)
            self.scoring.append(q)
        self.seen += q
        self.generated += q
        self._scores_pending = self.active

    def _score_view(self) -> ScoreContext:
        """The evictable slots as the core sees them; the record is made again only when the slots' tensors
        were replaced (in-place writes keep its views valid), and its ``now`` follows the layer."""
        key = (self.slots.version, self.slots.fixed)
        if self._view is None or self._view[0] != key:
            keys, values, positions, valid = self.slots.evictable()
            view = ScoreContext(None, keys, None, positions=positions, values=values, valid=valid,
                                layer_idx=self.plan.layer_idx, num_layers=self.plan.num_layers,
                                window=self._window_attention if self.window.size else None)
            self._view = (key, view)
        view = self._view[1]
        view.now = self.seen - 1
        return view

    def _window_attention(self, last: int) -> torch.Tensor:
        attention = self.window.attention(last, self.keys, self.positions, self.valid, self.plan.sliding_window)
        return attention[..., self.slots.fixed :]

    # ----------------------------------------------------------------- 2. the attention function's one question
    def step_mask(self, mask, query: torch.Tensor, key: torch.Tensor, additive: bool):
        """The mask to attend with (see :mod:`~momentkv.engine.masks`); learns a new chunk's padding first."""
        step = self.step
        if step.chunk is not None:
            (start, length), step.chunk = step.chunk, None
            valid = masks.key_validity(mask, length)
            if valid is not None:
                self.slots.set_validity(start, valid)
        if masks.transformers_mask_is_exact(mask, self.slots.in_order, query.shape[2], key.shape[2]):
            return mask
        return masks.positional_mask(self.positions, self.valid, self.seen, query.shape[2], self.plan.sliding_window,
                                     query.shape[1] // key.shape[1], additive, query.dtype)

    # ----------------------------------------------------------------- 3. the step handed back
    def observe(self, query: torch.Tensor, key: torch.Tensor, mask, scaling: float,
                attention: torch.Tensor | None = None) -> None:
        """Take this step: ``query`` ``(batch, heads, q, head_dim)``, ``key`` the layer's keys, and, when the
        attention function computed it, ``attention`` ``(batch, kv_heads, S)`` of the last query."""
        step, window = self.step, self.eviction.window
        if window.size and (step.context or self.eviction.scoring.query_window):
            window.push(query, self.seen - query.shape[2], scaling)
        if step.context:
            if self.plan.scope == "all" and self.active and self.plan.needs_step_attention:
                # A row that is padding from end to end has a last context query that sees nothing.
                self.context.last_attention = group_attention(query, key, mask, scaling, rows_may_be_empty=True)
        elif self.active:
            if attention is None and self.plan.needs_step_attention:  # not computed with the output (dropout)
                attention = group_attention(query, key, mask, scaling)
            self.update_scores(attention)

    def update_scores(self, attention: torch.Tensor | None) -> None:
        """Fold one decode step into the scorers: ``attention`` ``(batch, kv_heads, S)`` over all stored slots.

        Called by ``observe``; ``momentkv.testing`` calls it directly with synthetic attention.
        """
        self._scores_pending = False
        f = self.slots.fixed
        self.eviction.fold(attention[..., f:] if attention is not None and f else attention, self._score_view(),
                           self.context.prompt_tokens)

    # ----------------------------------------------------------------- transformers' cache-layer interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.slots.start(key_states, value_states)
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): the model derives positions from it in manual loops."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped: evicted tokens cannot be restored")

    def _select_rows(self, pick) -> None:
        """Every per-row tensor lives in one of the parts, and each part moves its own."""
        if self.is_initialized:
            self.slots.select_rows(pick)
            self.scoring.select_rows(pick)
            self.window.select_rows(pick)
            self.context.select_rows(pick)

    def reset(self) -> None:
        context_end, active = self.context.end, self.active
        self.__init__(self.plan)
        self.context.end, self.active = context_end, active

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Stored tokens, peak, evictions and bytes of this layer, per batch row and KV head."""
        kv_bytes = 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
        prompt_stored = self.slots.fixed
        if self.plan.scope == "all":
            # Decode eviction reaches the prompt: count the prompt tokens still held (the most of any head).
            prompt_stored = int((self.positions < self.prompt_tokens).sum(-1).max()) if self.stored else 0
        return {
            "layer": self.plan.layer_idx,
            "seen": self.seen,
            "stored": self.stored,
            "prompt_stored": prompt_stored,
            "generated_stored": self.stored - prompt_stored,
            "peak": self.peak_slots,
            "evicted": self.evicted,
            "budget": self.plan.budget_at(self.generated),
            "kv_bytes": kv_bytes,
            "state_bytes": self.slots.bookkeeping_bytes() + self.scoring.nbytes(),
        }
