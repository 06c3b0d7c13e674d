"""The end of a context chunk: which context tokens a prefill compressor keeps.

Context is every token fed as part of a multi-token chunk: the prompt, and each later user turn of a
conversation continued through the same cache. With ``scope: decode`` the context occupies the layer's
leading slots, in sequence order, and is never evicted at decode time; a prefill compressor (SnapKV,
PyramidKV, ...) may keep only part of it. It runs when the chunk is complete (at the next decode step), over
the whole context region, with the attention of the last context queries recomputed against it.
"""

from __future__ import annotations

import torch

from momentkv.engine.query_window import QueryWindow
from momentkv.prefill.base import PrefillCompressor, PrefillContext


def context_keep(compressor: PrefillCompressor, keys: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None, window: QueryWindow, sliding_window: int | None,
                 layer_idx: int, num_layers: int) -> torch.Tensor | None:
    """The context slots to keep, ``(batch, kv_heads, capacity)`` ascending; ``None`` to keep them all.

    Args:
        keys: ``(batch, kv_heads, C, head_dim)``, the context region's keys.
        positions: ``(batch, kv_heads, C)``; valid: ``(batch, kv_heads, C)`` bool or ``None``.
        window: the layer's recent queries (the last context queries are among them).
    """
    b, h, c, _ = keys.shape
    capacity = compressor.layer_capacity(c, layer_idx, num_layers)
    if capacity is None or capacity >= c:
        return None
    row_valid = torch.ones((b, c), dtype=torch.bool, device=keys.device) if valid is None else valid[:, 0]
    attention = None
    size = compressor.window_size()
    if size:
        last = min(size, window.size)
        attention = window.attention(last, keys, positions, valid, sliding_window)
    ctx = PrefillContext(layer_idx=layer_idx, num_layers=num_layers, keys=keys, window_attention=attention,
                         valid=row_valid)
    return compressor.select(ctx, capacity).sort(dim=-1).values


class ContextStage:
    """The context half of :class:`~momentkv.engine.layer.EvictingLayer`: receiving chunks and finishing them.

    With ``scope: decode`` context goes into the leading ``context_slots`` slots (a later chunk lands after
    the earlier context, before the generated tokens); with ``scope: all`` it is appended and evictable.
    """

    def _receive_context(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = key_states.shape[-2]
        at = self.stored if self.plan.scope == "all" else self.context_slots
        self.slots.insert(at, key_states, value_states, self.seen)
        if self.plan.scope == "all":
            self.scoring.append(q)
        else:
            self.context_slots += q
        self._chunk = (at, q)  # its padding is read off the model's mask at attention time
        self.seen += q
        if self.generated == 0:
            self.prompt_tokens = self.seen
        self.in_context = True

    def _finish_context(self) -> None:
        """The chunk is complete: compress the context, then score from the next decode step on."""
        self.in_context = False
        region = self.context_slots if self.plan.scope == "decode" else (self.stored if self.generated == 0 else 0)
        if region and self.plan.prefill.type != "keep":
            valid = self.valid
            keep = context_keep(self.plan.prefill, self.keys[:, :, :region], self.positions[..., :region],
                                None if valid is None else valid[..., :region], self.window,
                                self.plan.sliding_window, self.plan.layer_idx, self.plan.num_layers)
            if keep is not None:
                self._keep_context(keep, region)
        if not self.scoring.started:
            b, h, s = self.positions.shape
            self.scoring.start(b, h, s - self.first_evictable, self.device)
        if self.plan.scope == "all" and self.active:
            # Context tokens enter the ranking as if the last context query were a decode step: each scorer
            # folds in the attention that query gave them (TOVA's ranking of the prompt).
            self.update_scores(self._last_attention if self.scoring.needs_step_attention else None)
        self._last_attention = None

    def _keep_context(self, keep: torch.Tensor, region: int) -> None:
        """Keep the context slots ``keep`` ``(b, h, n)`` of the first ``region`` slots, and everything after."""
        b, h, _ = keep.shape
        rest = torch.arange(region, self.stored, device=keep.device).expand(b, h, -1)
        index = torch.cat([keep, rest], dim=-1)
        self.slots.keep(index)
        if self._last_attention is not None:  # the last context query's attention, over the slots before
            self._last_attention = self._last_attention.gather(-1, index)
        if self.plan.scope == "all":
            if self.scoring.started:
                self.scoring.keep(keep)
        else:
            self.context_slots = keep.shape[-1]

    def _drop_dead_context(self) -> None:
        """Sliding layers: drop the context tokens no query can see again (the oldest, in every head)."""
        c = self.context_slots
        if not c:
            return
        gone = self.positions[..., :c] <= self.seen - self.plan.sliding_window
        count = int(gone.sum(-1).min())
        if count:
            b, h, _ = gone.shape
            self.slots.keep(torch.arange(count, self.stored, device=gone.device).expand(b, h, -1))
            self.context_slots -= count
