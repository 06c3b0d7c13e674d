"""transformers' cache-layer interface over a layer's parts: slots, scorer states, query window.

``CacheLayerMixin`` is the seam transformers' ``Cache`` calls: sizes for the mask, the sequence length,
beam reordering and batch selection. Every per-row tensor lives in one of three parts, and each part moves
its own tensors, so a row selection can never leave one behind.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from momentkv.engine.plan import LayerPlan
from momentkv.engine.query_window import QueryWindow
from momentkv.engine.scores import LayerScoring
from momentkv.engine.slots import Slots


class SlotLayer(CacheLayerMixin):
    """The parts of a layer and transformers' interface to them; :class:`EvictingLayer` adds the data flow."""

    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        self.slots = Slots()
        super().__init__()
        self.plan = plan
        self.is_sliding = plan.sliding_window is not None  # read by transformers' Cache
        self.scoring = LayerScoring(plan.scorers if plan.budget is not None else ())
        self.window = QueryWindow(max(plan.prefill.window_size(), self.scoring.query_window))
        self.seen = 0  # tokens fed through this layer

    keys = property(lambda self: self.slots.keys, lambda self, v: setattr(self.slots, "keys", v))
    values = property(lambda self: self.slots.values, lambda self, v: setattr(self.slots, "values", v))
    positions = property(lambda self: self.slots.positions, doc="``(batch, kv_heads, S)`` sequence indices.")
    valid = property(lambda self: self.slots.valid, doc="``(batch, kv_heads, S)`` bool, or None: no padding.")
    stored = property(lambda self: self.slots.stored, doc="Slots per (batch row, KV head).")
    scores = property(lambda self: self.scoring.step_total, doc="The every-step scorers' score of the last step.")

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
        if self.is_initialized:
            self.slots.select_rows(pick)
            self.scoring.select_rows(pick)
            self.window.select_rows(pick)
