"""Slot storage of one cache layer: keys, values, the token in each slot, and its validity.

``S`` slots per (batch row, KV head); every head holds the same number of slots, so the tensors stay
rectangular while each head keeps its own tokens:

- ``keys``, ``values``: ``(batch, kv_heads, S, head_dim)``.
- ``positions``: ``(batch, kv_heads, S)`` int64, the sequence index of the token in each slot (the number of
  tokens fed before it). Stored only once tokens have moved; until then slot ``j`` holds token ``j`` and
  ``positions`` is a broadcast ``arange`` (no per-step bookkeeping while the cache only grows).
- ``valid``: ``(batch, kv_heads, S)`` bool, False at padding; ``None`` while there is none.

Every operation keeps the four aligned: append at the end, insert a chunk at a slot index, write one token
per head into a chosen slot (in place, no reallocation), keep a subset of slots, select batch rows.

The first ``fixed`` slots are never evicted at decode time (the context, under ``scope: decode``); the rest
are the *evictable* slots, which the eviction core sees and names by their index among themselves:
:meth:`evictable`, :meth:`write_evictable` and :meth:`keep_evictable` translate those indices to slots.
"""

from __future__ import annotations

import torch


class Slots:
    """The per-slot tensors of one layer (see the module docstring)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.fixed = 0  # leading slots decode eviction never touches
        self.version = 0  # bumped whenever a tensor is replaced (not on in-place writes): views stay valid

    def start(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty storage with the shape, dtype and device of the first ``(batch, kv_heads, q, head_dim)`` states."""
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.version += 1

    @property
    def stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def in_order(self) -> bool:
        """Whether slot ``j`` still holds token ``j`` in every head (nothing evicted, dropped or moved)."""
        return self._positions is None

    @property
    def positions(self) -> torch.Tensor | None:
        if self._positions is None and self.keys is not None:
            b, h, s, _ = self.keys.shape
            return torch.arange(s, device=self.keys.device).expand(b, h, s)
        return self._positions

    def _materialize(self) -> torch.Tensor:
        if self._positions is None:
            self._positions = self.positions.contiguous()
            self.version += 1
        return self._positions

    def _names(self) -> list[str]:
        names = ["keys", "values"]
        if self._positions is not None:
            names.append("_positions")
        return names + (["valid"] if self.valid is not None else [])

    def insert(self, at: int, key_states: torch.Tensor, value_states: torch.Tensor, first_position: int) -> None:
        """Insert ``q`` tokens (states ``(b, h, q, d)``, sequence indices from ``first_position``) at slot ``at``."""
        b, h, q, _ = key_states.shape
        s = self.stored
        if at != s or (self._positions is None and first_position != s):
            self._materialize()  # slots stop following sequence order
        new = {"keys": key_states, "values": value_states}
        if self._positions is not None:
            new["_positions"] = torch.arange(first_position, first_position + q, device=self.keys.device).expand(b, h, q)
        if self.valid is not None:
            new["valid"] = self.valid.new_ones((b, h, q))
        for name in self._names():
            t = getattr(self, name)
            parts = [t, new[name]] if at == s else [t[:, :, :at], new[name], t[:, :, at:]]
            setattr(self, name, torch.cat(parts, dim=2))
        self.version += 1

    def write(self, slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, position: int) -> None:
        """Overwrite slot ``slot`` ``(b, h, 1)`` of each head with one token ``(b, h, 1, d)``, in place."""
        index = slot.unsqueeze(-1)
        self.keys.scatter_(2, index.expand(-1, -1, -1, key_states.shape[-1]), key_states)
        self.values.scatter_(2, index.expand(-1, -1, -1, value_states.shape[-1]), value_states)
        self._materialize().scatter_(2, slot, position)
        if self.valid is not None:
            self.valid.scatter_(2, slot, True)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the slots ``index`` ``(b, h, n)`` (in that order) in every per-slot tensor."""
        self._materialize()
        for name in self._names():
            t = getattr(self, name)
            idx = index if t.dim() == 3 else index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
            setattr(self, name, t.gather(2, idx))
        self.version += 1

    @property
    def evictable_count(self) -> int:
        return self.stored - self.fixed

    def evictable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views of the evictable slots: keys, values ``(b, h, T, d)``, positions and validity ``(b, h, T)``."""
        f, valid = self.fixed, self.valid
        return (self.keys[:, :, f:], self.values[:, :, f:], self.positions[..., f:],
                None if valid is None else valid[..., f:])

    def write_evictable(self, slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                        position: int) -> None:
        """:meth:`write` into evictable slot ``slot`` ``(b, h, 1)`` (an index among the evictable slots)."""
        self.write(slot + self.fixed if self.fixed else slot, key_states, value_states, position)

    def keep_evictable(self, kept: torch.Tensor) -> None:
        """Keep the fixed slots and the evictable slots ``kept`` ``(b, h, n)`` (indices among the evictable)."""
        f = self.fixed
        if f:
            b, h, _ = kept.shape
            kept = torch.cat([torch.arange(f, device=kept.device).expand(b, h, f), kept + f], dim=-1)
        self.keep(kept)

    def set_validity(self, start: int, valid: torch.Tensor) -> None:
        """Mark slots ``[start, start + q)`` valid or padding: ``valid`` ``(batch, q)`` bool, for every head."""
        if self.valid is None:
            if bool(valid.all()):
                return
            b, h, s, _ = self.keys.shape
            self.valid = torch.ones((b, h, s), dtype=torch.bool, device=self.keys.device)
            self.version += 1
        self.valid[:, :, start : start + valid.shape[-1]] = valid.unsqueeze(1)

    def select_rows(self, pick) -> None:
        for name in self._names():
            setattr(self, name, pick(getattr(self, name)))
        self.version += 1

    def bookkeeping_bytes(self) -> int:
        return sum(t.nbytes for t in (self._positions, self.valid) if t is not None)
