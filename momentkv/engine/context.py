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

from momentkv.core.query_window import QueryWindow
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
        own = window.count_since(since)
        if own:
            attention = window.attention(min(size, own), keys, positions, valid, sliding_window)[..., start:end]
        else:  # no query of the chunk was seen (not fed through a patched model's attention)
            attention = keys.new_zeros((b, h, 1, 0, c), dtype=torch.float32)
    ctx = PrefillContext(layer_idx=layer_idx, num_layers=num_layers, keys=keys[:, :, start:end],
                         window_attention=attention, valid=row_valid)
    return compressor.select(ctx, capacity).sort(dim=-1).values


class Context:
    """The context of one layer: where each chunk goes, and its compression when it is complete.

    Owns what it tracks: the first prompt's length, where the caller said context ends, whether the last
    tokens fed were context, where the pending unit of compression began, and the last context query's
    attention (``scope: all``). With ``scope: decode`` the context is the layer's leading slots, ``slots.fixed``
    of them, which decode eviction never touches (a later chunk lands after the earlier context, before the
    generated tokens); with ``scope: all`` it is appended and evictable like any token.
    """

    def __init__(self, plan, slots, scoring, window: QueryWindow):
        self.plan, self.slots, self.scoring, self.window = plan, slots, scoring, window
        self.prompt_tokens = 0  # length of the first prompt
        self.end: int | None = None  # tokens before this index are context, when the caller says so
        self.in_context = True  # the last tokens fed were context
        self.since = 0  # sequence index of the first token of the context not yet compressed
        self.since_slot = 0  # and its slot (nothing before it moves while context arrives)
        self.last_attention: torch.Tensor | None = None  # the last context query's attention (scope: all)

    def takes(self, seen: int, q: int) -> bool:
        """Whether ``q`` tokens fed after ``seen`` are context: the first tokens, a multi-token chunk, or tokens
        the caller announced as context."""
        return seen == 0 or q > 1 or (self.end is not None and seen < self.end)

    def receive(self, key_states: torch.Tensor, value_states: torch.Tensor, seen: int, generated: int) -> tuple[int, int]:
        """Store a chunk ``(b, h, q, d)`` at sequence indices from ``seen``; return its ``(first slot, length)``."""
        q = key_states.shape[-2]
        slots = self.slots
        at = slots.stored if self.plan.scope == "all" else slots.fixed
        if not self.in_context:  # the first chunk after a generated token: a new unit of compression
            self.since, self.since_slot = seen, at
        slots.insert(at, key_states, value_states, seen)
        if self.plan.scope == "all":
            self.scoring.append(q)
        else:
            slots.fixed += q
        if generated == 0:
            self.prompt_tokens = seen + q
        self.in_context = True
        return at, q

    def pending(self) -> tuple[int, int]:
        """The slots ``(start, end)`` of the context fed since the last generated token, in every head.

        It is the tail of the context: the leading ``slots.fixed`` slots with ``scope: decode``, every slot
        with ``scope: all`` (nothing is evicted while context arrives). Earlier context and generated tokens
        all come before it in sequence order, and every head holds all of it.
        """
        end = self.slots.fixed if self.plan.scope == "decode" else self.slots.stored
        return min(self.since_slot, end), end

    def finish(self) -> None:
        """The chunk is complete: compress it on its own (if the policy names a compressor)."""
        self.in_context = False
        start, end = self.pending()
        if end > start and self.plan.prefill.type != "keep":
            slots = self.slots
            keep = context_keep(self.plan.prefill, slots.keys, slots.positions, slots.valid, self.window,
                                self.plan.sliding_window, self.plan.layer_idx, self.plan.num_layers,
                                chunk=(start, end), since=self.since)
            if keep is not None:
                self._keep(keep + start, start, end)

    def _keep(self, keep: torch.Tensor, start: int, end: int) -> None:
        """Of the chunk's slots ``start`` to ``end``, keep ``keep`` ``(b, h, n)``; every other slot stays."""
        b, h, _ = keep.shape
        slots = self.slots
        before = torch.arange(start, device=keep.device).expand(b, h, -1)
        after = torch.arange(end, slots.stored, device=keep.device).expand(b, h, -1)
        index = torch.cat([before, keep, after], dim=-1)
        slots.keep(index)
        if self.last_attention is not None:  # the last context query's attention, over the slots before
            self.last_attention = self.last_attention.gather(-1, index)
        if self.plan.scope == "all":
            if self.scoring.started:
                self.scoring.keep(index)
        else:
            slots.fixed -= end - start - keep.shape[-1]

    def drop_dead(self, seen: int) -> None:
        """Sliding layers: drop the context tokens no query from ``seen`` on can see (the oldest, in every head)."""
        slots, c = self.slots, self.slots.fixed
        if not c:
            return
        gone = slots.positions[..., :c] <= seen - self.plan.sliding_window
        count = int(gone.sum(-1).min())
        if count:
            b, h, _ = gone.shape
            slots.keep(torch.arange(count, slots.stored, device=gone.device).expand(b, h, -1))
            slots.fixed -= count

    def select_rows(self, pick) -> None:
        if self.last_attention is not None:
            self.last_attention = pick(self.last_attention)
