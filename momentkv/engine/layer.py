"""The evicting cache layer: context kept whole, generated tokens held to a budget.

A coordinator over parts with one job each: :mod:`~momentkv.engine.slots` (storage),
:mod:`~momentkv.engine.scores` (scorer states), :mod:`~momentkv.engine.ranking` (protections and victims),
:mod:`~momentkv.engine.masks` (the mask to attend with), :mod:`~momentkv.engine.context` (context chunks and
prefill compression), :mod:`~momentkv.engine.layer_base` (transformers' interface).

With ``scope: decode`` the slots are ``[context | generated]``: context (the prompt and any later multi-token
chunk, such as a new user turn) fills the leading slots and is never evicted at decode time; generated tokens
(fed one at a time) follow and are evictable. With ``scope: all`` every slot is evictable.

Per decode step, data flows one way: ``update`` (called by the attention module through the cache) ranks
the evictable slots when the budget is full and writes the new token into the lowest-ranked slot of each
head (no reallocation); the attention function computes the output and hands this step's attention to
``observe``, which updates the scorers. The token written at a step is never the one evicted at that step.
"""

from __future__ import annotations

import torch

from momentkv.engine import masks, ranking
from momentkv.engine.context import ContextStage
from momentkv.engine.group_attention import group_attention
from momentkv.engine.layer_base import SlotLayer
from momentkv.engine.plan import LayerPlan
from momentkv.engine.scores import ScoreInputs
from momentkv.engine.stats import layer_stats
from momentkv.errors import PolicyError


class EvictingLayer(ContextStage, SlotLayer):
    """One layer's KV cache under a :class:`~momentkv.engine.plan.LayerPlan` (see the module docstring)."""

    def __init__(self, plan: LayerPlan):
        super().__init__(plan)
        self.rules = ranking.Protections(plan.sinks, plan.recent, plan.sliding_window, plan.scope == "all",
                                         plan.granularity == "layer")
        self.active = plan.budget is not None  # False: this cache will not reach the budget (see ``expect``)
        self.prompt_tokens = 0  # length of the first prompt
        self.context_slots = 0  # leading slots holding context (scope: decode)
        self.context_end: int | None = None  # tokens before this index are context, when the caller says so
        self.in_context = True  # the last tokens fed were context
        self.generated = 0  # tokens fed one at a time
        self.evicted = 0  # tokens evicted per (batch row, KV head)
        self.peak_slots = 0
        self._chunk: tuple[int, int] | None = None  # (first slot, length) of a chunk whose padding is unknown
        self._last_attention: torch.Tensor | None = None  # last context query's attention (scope: all)
        self._scores_pending = False  # a token was written and its step's attention not yet folded in
        self._views: tuple | None = None  # (slot version, first evictable) and the ScoreInputs made for them

    @property
    def first_evictable(self) -> int:
        return 0 if self.plan.scope == "all" else self.context_slots

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **extra):
        """Store ``key_states``/``value_states`` ``(batch, kv_heads, q, head_dim)``; return the whole layer.

        ``kwargs`` is the dict the attention module later unpacks into the attention function: the layer
        puts itself there so that the attention function can hand it the attention of this step.
        """
        if kwargs is not None:
            kwargs["momentkv_layer"] = self
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.seen == 0 or q > 1 or (self.context_end is not None and self.seen < self.context_end):
            self._receive_context(key_states, value_states)
        else:
            if self.in_context:
                self._finish_context()
            elif self._scores_pending:
                raise PolicyError(
                    f"layer {self.plan.layer_idx}: the attention of the last step never reached this cache, so its "
                    "scores would go stale; use the cache with a model patched by momentkv.patch() (its attention "
                    "function reports to the cache) on transformers >= 5.24"
                )
            self._receive_generated(key_states, value_states)
        self.peak_slots = max(self.peak_slots, self.stored)
        return self.keys, self.values

    def expect(self, context_end: int, max_new_tokens: int | None = None) -> None:
        """Tokens before ``context_end`` are context; at most ``max_new_tokens`` follow (see ``EvictingCache``)."""
        self.context_end = context_end
        if self.plan.budget is None or max_new_tokens is None:
            self.active = self.plan.budget is not None
            return
        later_context = max(context_end - self.seen, 0) if self.plan.scope == "all" else 0
        held = self.stored - self.first_evictable + later_context + max_new_tokens
        reached = held > self.plan.budget_at(self.generated + max_new_tokens)
        self.active = reached or (self.active and self.generated > 0)  # scoring, once begun, never stops

    def _receive_generated(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.is_sliding and self.plan.scope == "decode":
            self._drop_dead_context()
        q, first = key_states.shape[-2], self.first_evictable
        count = self._evictions_needed(q)
        if count == 1 and q == 1:  # steady state: the new token takes each head's lowest-ranked slot
            slot = ranking.lowest(self._ranked(1))
            self.slots.write(slot + first, key_states, value_states, self.seen)
            self.scoring.reset_slot(slot)
            self.evicted += 1
        else:
            if count:
                kept, evicted = ranking.survivors(self._ranked(q), count)
                head = torch.arange(first, device=kept.device).expand(*kept.shape[:2], first)
                self.slots.keep(torch.cat([head, kept + first], dim=-1))
                self.scoring.keep(kept)
                self.evicted += evicted
            self.slots.insert(self.stored, key_states, value_states, self.seen)
            self.scoring.append(q)
        self.seen += q
        self.generated += q
        self._scores_pending = self.active

    def _evictions_needed(self, q: int) -> int:
        """Tokens each head must lose before ``q`` new ones are written: over budget, or dead (sliding)."""
        held = self.stored - self.first_evictable
        budget = self.plan.budget_at(self.generated + q) if self.active else None
        count = 0
        if budget is not None and held + q > budget and (
            self.plan.cadence == 1 or held + q > budget + self.plan.cadence - 1
        ):
            count = held + q - budget
        if self.is_sliding and held:
            gone = ranking.dead(self.positions[..., self.first_evictable :], self.seen, self.plan.sliding_window)
            count = max(count, int(gone.sum(-1).min()))
        return count

    def _inputs(self) -> ScoreInputs:
        """What the scorers see; the tensor views are made again only when the slots' tensors were replaced."""
        first, valid = self.first_evictable, self.valid
        key = (self.slots.version, first)
        if self._views is not None and self._views[0] == key:
            inputs = self._views[1]
            inputs.now = self.seen - 1
            return inputs
        inputs = ScoreInputs(
            keys=self.keys[:, :, first:], values=self.values[:, :, first:], positions=self.positions[..., first:],
            valid=None if valid is None else valid[..., first:], now=self.seen - 1,
            layer_idx=self.plan.layer_idx, num_layers=self.plan.num_layers,
            window=self._window_attention if self.window.size else None,
        )
        self._views = (key, inputs)
        return inputs

    def _window_attention(self, last: int) -> torch.Tensor:
        attention = self.window.attention(last, self.keys, self.positions, self.valid, self.plan.sliding_window)
        return attention[..., self.first_evictable :]

    def _ranked(self, incoming: int) -> torch.Tensor:
        inputs = self._inputs()
        return ranking.rank(self.scoring.total(inputs), inputs.positions, inputs.valid, self.rules,
                            self.prompt_tokens, self.seen, incoming)

    # ----------------------------------------------------------------- from the attention function
    def attention_mask(self, mask, query: torch.Tensor, key: torch.Tensor, additive: bool):
        """The mask to attend with (see :mod:`~momentkv.engine.masks`); learns a new chunk's padding first."""
        if self._chunk is not None:
            (start, length), self._chunk = self._chunk, None
            valid = masks.key_validity(mask, length)
            if valid is not None:
                self.slots.set_validity(start, valid)
        if masks.transformers_mask_is_exact(mask, self.slots.in_order, query.shape[2], key.shape[2]):
            return mask
        return masks.positional_mask(self.positions, self.valid, self.seen, query.shape[2], self.plan.sliding_window,
                                     query.shape[1] // key.shape[1], additive, query.dtype)

    def wants_step_attention(self, query: torch.Tensor) -> bool:
        """Whether this call is a decode step whose scorers need the attention of its query."""
        return not self.in_context and self.active and self.scoring.needs_step_attention and query.shape[2] == 1

    def observe(self, query: torch.Tensor, key: torch.Tensor, mask, scaling: float,
                attention: torch.Tensor | None = None) -> None:
        """Take this step: ``query`` ``(batch, heads, q, head_dim)``, ``key`` the layer's keys, and, when the
        attention function computed it, ``attention`` ``(batch, kv_heads, S)`` of the last query."""
        if self.window.size and (self.in_context or self.scoring.query_window):
            self.window.push(query, self.seen - query.shape[2], scaling)
        if self.in_context:
            if self.plan.scope == "all" and self.active and self.scoring.needs_step_attention:
                # A row that is padding from end to end has a last context query that sees nothing.
                self._last_attention = group_attention(query, key, mask, scaling, rows_may_be_empty=True)
        elif self.active:
            if attention is None and self.scoring.needs_step_attention:
                attention = group_attention(query, key, mask, scaling)
            self.update_scores(attention)

    def update_scores(self, attention: torch.Tensor | None) -> None:
        """Fold one decode step into the scorers: ``attention`` ``(batch, kv_heads, S)`` over all stored slots.

        Called by ``observe``; ``momentkv.testing`` calls it directly with synthetic attention.
        """
        self._scores_pending = False
        first = self.first_evictable
        self.scoring.step(attention[..., first:] if attention is not None and first else attention, self._inputs())

    def reset(self) -> None:
        context_end, active = self.context_end, self.active
        self.__init__(self.plan)
        self.context_end, self.active = context_end, active

    def _select_rows(self, pick) -> None:
        super()._select_rows(pick)
        if self._last_attention is not None:
            self._last_attention = pick(self._last_attention)

    def stats(self) -> dict:
        """Stored tokens, peak, evictions and bytes of this layer (see :mod:`~momentkv.engine.stats`)."""
        return layer_stats(self)
