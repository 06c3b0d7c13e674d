"""The end of a context chunk: which of its tokens a prefill compressor keeps.

Context is every token fed as part of a multi-token chunk: the prompt, and each later user turn of a
conversation continued through the same cache. With ``scope: decode`` the context occupies the layer's
leading slots, in sequence order, and is never evicted at decode time; a prefill compressor (SnapKV,
PyramidKV, ...) may keep only part of it.

The unit of compression is the context fed since the last generated token: the whole prompt (however many
forward calls it took), then each later turn on its own. It is compressed once, when it is complete (at the
next decode step): its tokens are the region, its capacity is the compressor's capacity for its length, and
its own last queries are the observation window, their attention recomputed against every key the layer held
when they ran (earlier context and generated tokens included, as the model attended). Earlier context,
compressed when its own turn ended, is kept as it was.
"""

from __future__ import annotations

import torch

from momentkv.engine.query_window import QueryWindow
from momentkv.prefill.base import PrefillCompressor, PrefillContext


def context_keep(compressor: PrefillCompressor, keys: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None, window: QueryWindow, sliding_window: int | None,
                 layer_idx: int, num_layers: int, chunk: tuple[int, int] | None = None,
                 since: int = 0) -> torch.Tensor | None:
    """The chunk's slots to keep, ``(batch, kv_heads, capacity)`` ascending and counted from the chunk's first
    slot; ``None`` to keep them all.

    Args:
        keys: ``(batch, kv_heads, S, head_dim)``, every key the layer stores.
        positions: ``(batch, kv_heads, S)``; valid: ``(batch, kv_heads, S)`` bool or ``None``.
        window: the layer's recent queries (the chunk's last queries are the latest among them).
        chunk: the chunk's slots ``(start, end)``, the same in every head; ``None``: all of them. The other
            slots (earlier context, generated tokens) are neither kept nor dropped here, but the window's
            attention is computed over them too, as the model attended.
        since: the sequence index of the chunk's first token: earlier queries are not the chunk's window.
    """
    b, h, s, _ = keys.shape
    start, end = (0, s) if chunk is None else chunk
    c = end - start
    capacity = compressor.layer_capacity(c, layer_idx, num_layers)
    if capacity is None or capacity >= c:
        return None
    row_valid = torch.ones((b, c), dtype=torch.bool, device=keys.device) if valid is None else valid[:, 0, start:end]
    attention = None
    size = compressor.window_size()
    if size:
        own = 0 if window.positions is None else int((window.positions >= since).sum())
        if own:
            attention = window.attention(min(size, own), keys, positions, valid, sliding_window)[..., start:end]
        else:  # no query of the chunk was seen (not fed through a patched model's attention)
            attention = keys.new_zeros((b, h, 1, 0, c), dtype=torch.float32)
    ctx = PrefillContext(layer_idx=layer_idx, num_layers=num_layers, keys=keys[:, :, start:end],
                         window_attention=attention, valid=row_valid)
    return compressor.select(ctx, capacity).sort(dim=-1).values


class ContextStage:
    """The context half of :class:`~momentkv.engine.layer.EvictingLayer`: receiving chunks and finishing them.

    With ``scope: decode`` context goes into the leading ``context_slots`` slots (a later chunk lands after
    the earlier context, before the generated tokens); with ``scope: all`` it is appended and evictable.
    """

    def __init__(self, plan):
        super().__init__(plan)
        self.context_from = 0  # sequence index of the first token of the context not yet compressed

    def _receive_context(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = key_states.shape[-2]
        if not self.in_context:  # the first chunk after a generated token: a new unit of compression
            self.context_from = self.seen
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

    def _pending_context(self) -> tuple[int, int]:
        """The slots ``(start, end)`` of the context fed since the last generated token, in every head.

        It is the tail of the context: the leading ``context_slots`` slots with ``scope: decode``, every slot
        with ``scope: all`` (nothing is evicted while context arrives). Earlier context and generated tokens
        all come before it in sequence order, and every head holds all of it.
        """
        end = self.context_slots if self.plan.scope == "decode" else self.stored
        if not end:
            return 0, 0
        return end - int((self.positions[0, 0, :end] >= self.context_from).sum()), end

    def _finish_context(self) -> None:
        """The chunk is complete: compress it on its own, then score from the next decode step on."""
        self.in_context = False
        start, end = self._pending_context()
        if end > start and self.plan.prefill.type != "keep":
            keep = context_keep(self.plan.prefill, self.keys, self.positions, self.valid, self.window,
                                self.plan.sliding_window, self.plan.layer_idx, self.plan.num_layers,
                                chunk=(start, end), since=self.context_from)
            if keep is not None:
                self._keep_context(keep + start, start, end)
        if not self.scoring.started:
            b, h, s = self.positions.shape
            self.scoring.start(b, h, s - self.first_evictable, self.device)
        if self.plan.scope == "all" and self.active:
            # Context tokens enter the ranking as if the last context query were a decode step: each scorer
            # folds in the attention that query gave them (TOVA's ranking of the prompt).
            self.update_scores(self._last_attention if self.scoring.needs_step_attention else None)
        self._last_attention = None

    def _keep_context(self, keep: torch.Tensor, start: int, end: int) -> None:
        """Of the chunk's slots ``start`` to ``end``, keep ``keep`` ``(b, h, n)``; every other slot stays."""
        b, h, _ = keep.shape
        before = torch.arange(start, device=keep.device).expand(b, h, -1)
        after = torch.arange(end, self.stored, device=keep.device).expand(b, h, -1)
        index = torch.cat([before, keep, after], dim=-1)
        self.slots.keep(index)
        if self._last_attention is not None:  # the last context query's attention, over the slots before
            self._last_attention = self._last_attention.gather(-1, index)
        if self.plan.scope == "all":
            if self.scoring.started:
                self.scoring.keep(index)
        else:
            self.context_slots -= end - start - keep.shape[-1]

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
