"""The last queries a layer has seen, kept so that their attention can be recomputed against the current keys.

SnapKV-style prefill compressors rank prompt tokens by the attention of the last prompt queries; windowed
scorers (R-KV, G-KV) rank generated tokens by the attention of the last decode queries. Under SDPA the model
returns no attention weights, so the layer keeps those query states (a few rows) and computes their
attention when it is needed, against the keys stored at that moment. Recomputing rather than recording makes
chunked prefill exact (the window may span chunks) and costs nothing on the steps where nobody asks.
"""

from __future__ import annotations

from collections import deque

import torch

from momentkv.core.group_attention import grouped_probs


class QueryWindow:
    """Up to ``size`` recent queries ``(batch, heads, w, head_dim)`` and their sequence indices (``w`` ints, kept
    on the host: counting them needs no device sync, and a push costs no device operation)."""

    def __init__(self, size: int):
        self.size = size
        self.queries: torch.Tensor | None = None
        self.positions: deque[int] = deque(maxlen=size)
        self.scaling = 1.0

    def push(self, query: torch.Tensor, first_position: int, scaling: float) -> None:
        """Add ``query`` ``(b, heads, q, d)`` (sequence indices from ``first_position``); keep the last ``size``."""
        if self.size == 0:
            return
        q = query.shape[2]
        if self.queries is not None and q < self.size:
            query = torch.cat([self.queries, query], dim=2)
        # A copy, not a view: a view would keep the whole prompt's queries alive.
        self.queries = query[:, :, -self.size :].clone()
        self.positions.extend(range(max(first_position, first_position + q - self.size), first_position + q))
        self.scaling = scaling

    def count_since(self, index: int) -> int:
        """How many kept queries sit at sequence index ``index`` or later."""
        return sum(position >= index for position in self.positions)

    def select_rows(self, pick) -> None:
        if self.queries is not None:
            self.queries = pick(self.queries)

    def attention(self, last: int, keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                  sliding_window: int | None) -> torch.Tensor:
        """Softmax attention of the last ``last`` kept queries: ``(batch, kv_heads, groups, w, S)`` float32.

        Args:
            keys: ``(batch, kv_heads, S, head_dim)``, every key the layer stores now.
            positions: ``(batch, kv_heads, S)``, their sequence indices.
            valid: ``(batch, kv_heads, S)`` bool (False at padding) or ``None``.
            sliding_window: the layer's window, if any.

        Each query sees the stored keys at or before its own position (within the sliding window, not
        padding); a query that sees none (a padding query of a left-padded prompt) gives a row of zeros.
        """
        if last > self.size:
            raise ValueError(f"{last} queries asked for, the layer keeps {self.size}")
        if self.queries is None:
            b, kv, s = positions.shape  # no query yet: an empty window
            return keys.new_zeros((b, kv, 1, 0, s), dtype=torch.float32)
        queries = self.queries[:, :, -last:]
        w = queries.shape[2]
        q_pos = torch.tensor(list(self.positions)[-w:], device=keys.device)  # (w,)
        groups = queries.shape[1] // keys.shape[1]
        k_pos = positions.unsqueeze(2)  # (b, kv, 1, S)
        allowed = k_pos <= q_pos.view(1, 1, w, 1)  # (b, kv, w, S)
        if sliding_window is not None:
            allowed = allowed & (k_pos > q_pos.view(1, 1, w, 1) - sliding_window)
        if valid is not None:
            allowed = allowed & valid.unsqueeze(2)
        if groups > 1:
            allowed = allowed.repeat_interleave(groups, dim=1)  # (b, heads, w, S)
        return grouped_probs(queries, keys, allowed, self.scaling, rows_may_be_empty=True)
