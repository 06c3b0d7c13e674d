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
