"""The evicting cache layer: the prompt's keys and values kept, the generated tokens held to a budget.

Storage per layer, ``S`` slots per (batch row, KV head); every head holds the same number of slots, so the
tensors stay rectangular while each head keeps its own tokens:

- ``keys``, ``values``: ``(batch, kv_heads, S, head_dim)``. Slots ``[0, prompt_slots)`` hold the prompt and
  never move (unless a prefill compressor or ``scope: all`` says otherwise); the generated tokens follow.
- ``positions``: ``(batch, kv_heads, S)`` int64, the sequence index of the token in each slot (the number of
  tokens fed before it). Eviction reorders slots; positions keep masks, ages and sliding windows exact.
- ``valid``: ``(batch, kv_heads, S)`` bool, False at padding; ``None`` while there is none.
- ``scores`` and one float32 ``state`` per scorer: ``(batch, kv_heads, T)`` over the evictable slots.

Per step, data flows one way: ``update`` (called by the attention module through the cache) evicts the
lowest-scoring evictable token of each head when the budget is full and writes the new token into the freed
slot (no reallocation); the attention function then computes the output and hands the attention of the
current query to ``observe``, which updates the scorers. The token written at a step is therefore never the
one evicted at that step: the newest token is always protected.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from momentkv.engine.group_attention import group_attention
from momentkv.engine.plan import LayerPlan
from momentkv.errors import PolicyError
from momentkv.prefill.base import PrefillContext
from momentkv.prefill.window import prompt_window_attention
from momentkv.scoring.base import ScoreContext
from momentkv.scoring.normalize import normalize_scores


def _mask_last_row_valid(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Key validity ``(batch, length)`` read off the last query row of a 4D mask; ``None`` if all valid."""
    if mask is None:
        return None
    row = mask[:, 0, -1, -length:]
    valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    valid = valid.expand(batch, length)
    return None if bool(valid.all()) else valid


class EvictingLayer(CacheLayerMixin):
    """One layer's KV cache under a :class:`~momentkv.engine.plan.LayerPlan` (see the module docstring)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        self.is_sliding = plan.sliding_window is not None
        self.seen = 0  # tokens fed through this layer
        self.prompt_tokens = 0  # tokens in the prompt (sequence index of the first generated token)
        self.prompt_slots = 0  # slots holding prompt tokens
        self.in_prefill = True
        self.identity = True  # slot j holds token j in every head: transformers' own mask is exact
        self.compressed = False  # the prompt lost tokens (prefill compressor or scope: all)
        self._positions: torch.Tensor | None = None  # None while slot j holds token j (see `positions`)
        self.valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.states: list[torch.Tensor] = []
        self.evicted = 0  # tokens evicted per (batch row, KV head)
        self.peak_slots = 0
        self.timer = None  # a momentkv.bench.timing.StepTimes while benchmarking
        self.expected_prompt: int | None = None  # prompt length, when the caller knows it
        self._scores_pending = False  # a decode token was written and its step's attention not yet folded in
        self._window_queries: torch.Tensor | None = None  # (b, heads, <= window, d): the last prompt queries
        self._scaling = 1.0
        self._last_attention: torch.Tensor | None = None  # (b, h, prompt) for scope: all
        self._prompt_keep: torch.Tensor | None = None  # slots the prefill compressor kept

    # ----------------------------------------------------------------- transformers' layer interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

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
        if self.in_prefill and self._prompt_continues(q):
            self._append(key_states, value_states)
            self.prompt_tokens = self.prompt_slots = self.seen
            return self.keys, self.values
        if self.in_prefill:
            self._finish_prefill()
        elif self._scores_pending:
            raise PolicyError(
                f"layer {self.plan.layer_idx}: the attention of the last step never reached this cache, so its "
                "scores would go stale; use the cache with a model patched by momentkv.patch() (its attention "
                "function reports to the cache) on transformers >= 5.24"
            )
        self._insert_decode(key_states, value_states)
        self._scores_pending = self.plan.budget is not None
        return self.keys, self.values

    def _prompt_continues(self, q: int) -> bool:
        """Whether ``q`` incoming tokens still belong to the prompt.

        With the prompt length known (``generate`` tells the cache), exactly that many tokens are the
        prompt, however they are chunked; otherwise every multi-token call before the first single-token
        call is prompt.
        """
        if self.seen == 0:
            return True
        if self.expected_prompt is not None:
            return self.seen < self.expected_prompt
        return q > 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): the model derives positions from it in manual loops."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.plan)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped: evicted tokens cannot be restored")

    # ----------------------------------------------------------------- sizes and budget
    @property
    def positions(self) -> torch.Tensor | None:
        """``(batch, kv_heads, S)`` int64: the sequence index of the token in each slot.

        Stored only once eviction or compression has moved tokens; until then slot j holds token j and this
        returns a broadcast ``arange`` (no per-step bookkeeping while the cache only grows).
        """
        if self._positions is None and self.keys is not None:
            b, h, s, _ = self.keys.shape
            return torch.arange(s, device=self.keys.device).expand(b, h, s)
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._positions = value

    def _materialize_positions(self) -> torch.Tensor:
        if self._positions is None:
            self._positions = self.positions.contiguous()
        return self._positions

    @property
    def stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def first_evictable(self) -> int:
        return 0 if self.plan.scope == "all" else self.prompt_slots

    @property
    def generated(self) -> int:
        return self.seen - self.prompt_tokens

    def _budget(self, incoming: int) -> int | None:
        """Evictable tokens this layer may hold once ``incoming`` more are written."""
        return self.plan.budget_at(self.generated + incoming)

    # ----------------------------------------------------------------- writing tokens
    def _per_slot_tensors(self) -> list[str]:
        names = ["keys", "values"]
        if self._positions is not None:  # while None, positions follow the keys' shape (see `positions`)
            names.append("positions")
        return names + (["valid"] if self.valid is not None else [])

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, _ = key_states.shape
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self._positions is not None:  # slots no longer in sequence order: record where the new ones sit
            new_pos = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
            self._positions = torch.cat([self._positions, new_pos], dim=-1)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones((b, h, q))], dim=-1)
        if self.scores is not None:  # scoring has started (after the prompt)
            zeros = torch.zeros((b, h, q), dtype=torch.float32, device=self.device)
            self.scores = torch.cat([self.scores, zeros], dim=-1)
            self.states = [torch.cat([s, zeros], dim=-1) for s in self.states]
        self.seen += q
        self.peak_slots = max(self.peak_slots, self.stored)

    def _finish_prefill(self) -> None:
        """The prompt is complete: apply the prefill compressor, then start scoring evictable slots."""
        self.in_prefill = False
        self._compress_prompt()
        b, h, s = self.positions.shape
        evictable = s - self.first_evictable
        zeros = torch.zeros((b, h, evictable), dtype=torch.float32, device=self.device)
        self.states = [zeros.clone() for _ in self.plan.scorers]
        self.scores = zeros
        if self.plan.scope == "all" and self.plan.budget is not None:
            # Prompt tokens enter the ranking as if the last prompt query were the first scoring step: each
            # scorer folds in the attention that query gave them (TOVA's ranking of the prompt), or its
            # position/key score for scorers that need no attention.
            start = self._last_attention
            if start is not None and self._prompt_keep is not None:
                start = start.gather(2, self._prompt_keep)
            self.update_scores(start if self.plan.needs_attention else None)
        self._window_queries = self._last_attention = self._prompt_keep = None

    def _compress_prompt(self) -> None:
        """Keep the prompt slots the prefill compressor selects (nothing when the prompt fits its capacity).

        Runs at the first decode step, when every prompt slot is still at its own index (slot j = token j).
        """
        compressor = self.plan.prefill
        capacity = compressor.layer_capacity(self.prompt_slots, self.plan.layer_idx, self.plan.num_layers)
        if capacity is None or capacity >= self.prompt_slots:
            return
        b, h, _ = self.positions.shape
        valid = self.valid[:, 0] if self.valid is not None else torch.ones(
            (b, self.prompt_slots), dtype=torch.bool, device=self.device
        )
        window_attention = None
        if self._window_queries is not None:
            window_attention = prompt_window_attention(
                self._window_queries, self.keys, valid, self._scaling, self.plan.sliding_window
            )
        ctx = PrefillContext(
            layer_idx=self.plan.layer_idx,
            num_layers=self.plan.num_layers,
            keys=self.keys,
            window_attention=window_attention,
            valid=valid,
        )
        keep = compressor.select(ctx, capacity).sort(dim=-1).values  # (b, h, capacity), ascending positions
        self._gather_slots(keep)
        self._prompt_keep = keep
        self.prompt_slots = capacity
        self.compressed = True
        self.identity = False

    def _gather_slots(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` ``(batch, kv_heads, n)`` (ascending), in every per-slot tensor."""
        self._materialize_positions()  # slots stop matching sequence indices
        for name in self._per_slot_tensors():
            t = getattr(self, name)
            idx = keep if t.dim() == 3 else keep.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
            setattr(self, name, t.gather(2, idx))

    def _insert_decode(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = key_states.shape[-2]
        budget = self._budget(q)
        first = self.first_evictable
        held = self.stored - first
        if budget is None or held + q <= budget:
            self._append(key_states, value_states)
            return
        cadence = self.plan.cadence
        if cadence == 1 and q == 1 and held == budget:
            self._evict_in_place(key_states, value_states)
            return
        if held + q <= budget + cadence - 1:
            self._append(key_states, value_states)
            return
        self._evict_and_compact(held + q - budget)
        self._append(key_states, value_states)

    def _ranking(self, incoming: int) -> torch.Tensor:
        """Scores of the evictable slots ``(batch, kv_heads, T)`` with protected slots at +inf, dead at -inf."""
        ranked = self.scores
        pos = self.positions[..., self.first_evictable :]
        protected = None
        if self.plan.sinks:
            protected = pos < self.prompt_tokens + self.plan.sinks
            if self.plan.scope == "all":
                protected = protected & (pos >= self.prompt_tokens)
        if self.plan.recent > incoming:
            newest = pos >= self.seen + incoming - self.plan.recent
            protected = newest if protected is None else protected | newest
        if protected is not None:
            ranked = ranked.masked_fill(protected, float("inf"))
        if self.plan.sliding_window is not None:
            ranked = ranked.masked_fill(pos <= self.seen - self.plan.sliding_window, float("-inf"))
        if self.valid is not None and self.first_evictable == 0:  # padding is evictable only with scope: all
            ranked = ranked.masked_fill(~self.valid, float("-inf"))
        if self.plan.granularity == "layer":
            ranked = ranked.mean(dim=1, keepdim=True).expand_as(self.scores)
        return ranked

    def _evict_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Steady state: each head's lowest-ranked slot takes the new token; nothing is reallocated."""
        victim = self._ranking(1).argmin(dim=-1, keepdim=True)  # (b, h, 1)
        slot = victim + self.first_evictable if self.first_evictable else victim
        self.keys.scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1]), key_states)
        self.values.scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, value_states.shape[-1]), value_states)
        self._materialize_positions().scatter_(2, slot, self.seen)
        if self.valid is not None:
            self.valid.scatter_(2, slot, True)
        for state in self.states:
            state.scatter_(2, victim, 0.0)
        self.seen += 1
        self.evicted += 1
        self.identity = False
        if self.plan.scope == "all" and self.first_evictable == 0:
            self.compressed = True

    def _evict_and_compact(self, count: int) -> None:
        """Evict ``count`` lowest-ranked slots per head and close the gaps (used by cadence > 1 and q > 1)."""
        first = self.first_evictable
        ranked = self._ranking(0)
        count = min(count, int((ranked != float("inf")).sum(-1).min()))  # never a protected slot
        if count <= 0:
            return
        victims = ranked.topk(count, dim=-1, largest=False).indices  # (b, h, count)
        keep_mask = torch.ones_like(ranked, dtype=torch.bool).scatter_(-1, victims, False)
        kept = keep_mask.nonzero()[:, -1].view(*ranked.shape[:2], -1) + first  # ascending per head
        prompt = torch.arange(first, device=self.device).expand(*ranked.shape[:2], first)
        keep = torch.cat([prompt, kept], dim=-1)
        self._gather_slots(keep)
        kept_evictable = kept - first
        self.scores = self.scores.gather(2, kept_evictable)
        self.states = [s.gather(2, kept_evictable) for s in self.states]
        self.evicted += count
        self.identity = False
        if self.plan.scope == "all":
            self.compressed = True

    def _select_rows(self, pick) -> None:
        if not self.is_initialized:
            return
        for name in self._per_slot_tensors():
            setattr(self, name, pick(getattr(self, name)))
        if self.scores is not None:
            self.scores = pick(self.scores)
        self.states = [pick(s) for s in self.states]
        if self._window_queries is not None:
            self._window_queries = pick(self._window_queries)
        if self._last_attention is not None:
            self._last_attention = pick(self._last_attention)

    # ----------------------------------------------------------------- from the attention function
    def attention_mask(self, mask, query: torch.Tensor, key: torch.Tensor, additive: bool):
        """The mask to attend with: transformers' own while it is exact, else one built from positions.

        Transformers' mask indexes keys by slot; it stays exact for single-token decoding while the prompt
        is intact and no sliding window is reached. Otherwise the mask is ``(batch, heads, q, S)``, built
        from true positions, validity and the sliding window.
        """
        q_len, s = query.shape[2], key.shape[2]
        window = self.plan.sliding_window
        own = not self.identity and (
            self.compressed
            or q_len > 1
            or (window is not None and self.seen > window)
            or (mask is not None and mask.shape[-1] != s)
        )
        if not own:
            return mask
        groups = query.shape[1] // key.shape[1]
        q_pos = torch.arange(self.seen - q_len, self.seen, device=key.device).view(1, 1, q_len, 1)
        pos = self.positions.unsqueeze(2)  # (b, h, 1, S)
        allowed = pos <= q_pos
        if window is not None:
            allowed = allowed & (pos > q_pos - window)
        if self.valid is not None:
            allowed = allowed & self.valid.unsqueeze(2)
        if q_len == 1 and self.valid is None and (window is None or self.seen <= window) and bool(allowed.all()):
            return None
        allowed = allowed.repeat_interleave(groups, dim=1)
        if not additive:
            return allowed
        out = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        return out.masked_fill_(~allowed, torch.finfo(query.dtype).min)

    def observe(self, query: torch.Tensor, key: torch.Tensor, mask, scaling: float) -> None:
        """Take this step's attention: ``query`` ``(batch, heads, q, head_dim)``, ``key`` the layer's keys."""
        if self.in_prefill:
            self._observe_prefill(query, key, mask, scaling)
            return
        if self.plan.budget is None:
            return
        attention = group_attention(query[:, :, -1:], key, mask, scaling) if self.plan.needs_attention else None
        self.update_scores(attention)

    def update_scores(self, attention: torch.Tensor | None) -> None:
        """Fold one decode step into the scorers: ``attention`` ``(batch, kv_heads, S)`` over all stored slots.

        Called by ``observe``; tests and ``momentkv.testing`` call it directly with synthetic attention.
        """
        self._scores_pending = False
        first = self.first_evictable
        if attention is not None and first:
            attention = attention[..., first:]
        pos = self.positions[..., first:] if first else self.positions
        keys = self.keys[..., first:, :] if first else self.keys
        age = None  # computed once, by the first scorer that reads it
        combined = None
        for scorer, state in zip(self.plan.scorers, self.states):
            ctx = ScoreContext(attention=attention, keys=keys, state=state, age=age, positions=pos, now=self.seen - 1)
            out = scorer.update(ctx)
            age = ctx._age
            if scorer.normalize != "none":
                out = normalize_scores(out, scorer.normalize)
            if scorer.weight != 1.0:
                out = out * scorer.weight
            combined = out if combined is None else combined + out
        self.scores = combined

    def _observe_prefill(self, query, key, mask, scaling) -> None:
        b, _, q_len, _ = query.shape
        if self.identity:
            valid = _mask_last_row_valid(mask, b, key.shape[2])
            if valid is not None:
                self.valid = valid.unsqueeze(1).expand(-1, key.shape[1], -1).contiguous()
        window = self.plan.prefill.window_size()
        if window:
            # Keep the last `window` query states (a copy: a view would hold the whole prompt's queries);
            # their attention is computed once at the end of the prompt. A chunk shorter than the window
            # continues the window of the chunks before it.
            recent = query[:, :, -window:]
            if self._window_queries is not None and q_len < window:
                recent = torch.cat([self._window_queries, recent], dim=2)[:, :, -window:]
            self._window_queries = recent.clone()
            self._scaling = scaling
        if self.plan.scope == "all" and self.plan.needs_attention:
            # A row that is padding from end to end has a last prompt query that sees nothing.
            self._last_attention = group_attention(query[:, :, -1:], key, mask, scaling, rows_may_be_empty=True)

    # ----------------------------------------------------------------- reporting
    def stats(self) -> dict:
        """Stored tokens, peak, evictions and bytes of this layer (per batch row and KV head)."""
        kv_bytes = 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
        prompt_stored = self.prompt_slots
        if self.plan.scope == "all" and self.positions is not None and not self.in_prefill:
            # Decode eviction reaches the prompt: count the prompt tokens still held (the most of any head).
            prompt_stored = int((self.positions < self.prompt_tokens).sum(-1).max()) if self.stored else 0
        state_bytes = sum(t.nbytes for t in [self._positions, self.valid, self.scores, *self.states] if t is not None)
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
            "state_bytes": state_bytes,
        }
