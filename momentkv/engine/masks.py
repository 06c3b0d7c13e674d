"""The attention mask a layer attends with: transformers' own while it is exact, else one built from positions.

Transformers builds one mask per forward, sized from a reference layer and indexed by slot. It is exact for a
layer whose slot ``j`` still holds token ``j`` and whose key count matches the mask's width. Any other layer
(tokens evicted, dropped or moved, or a layer holding more or fewer slots than the reference layer: per-layer
budgets, uncompressed layers, sliding layers) builds its own mask ``(batch, heads, q, S)`` from the true
position of each slot, its validity and the sliding window.
"""

from __future__ import annotations

import torch


def transformers_mask_is_exact(mask, in_order: bool, q_len: int, stored: int) -> bool:
    """Whether the model's mask (``None`` or ``(b, 1 or heads, q, width)``) fits a layer of ``stored`` keys."""
    if not in_order:
        return False
    if mask is None:
        return q_len == 1 or q_len == stored  # one query sees everything; or the causal prompt alone
    return mask.shape[-1] == stored


def positional_mask(positions: torch.Tensor, valid: torch.Tensor | None, seen: int, q_len: int,
                    window: int | None, groups: int, additive: bool, dtype: torch.dtype):
    """The mask for ``q_len`` queries at positions ``seen - q_len ... seen - 1`` over slots at ``positions``.

    Args:
        positions: ``(batch, kv_heads, S)``; valid: ``(batch, kv_heads, S)`` bool or ``None``.
        groups: query heads per KV head (the mask is per query head).
        additive: an additive float mask in ``dtype`` (eager attention) rather than a bool one (SDPA).

    Returns ``None`` when a single query may see every slot (SDPA then needs no mask), else
    ``(batch, heads, q_len, S)``.
    """
    if q_len == 1 and valid is None and (window is None or seen <= window):
        return None  # every stored token precedes the query: it sees them all
    q_pos = torch.arange(seen - q_len, seen, device=positions.device).view(1, 1, q_len, 1)
    pos = positions.unsqueeze(2)  # (b, h, 1, S)
    allowed = pos <= q_pos
    if window is not None:
        allowed = allowed & (pos > q_pos - window)
    if valid is not None:
        allowed = allowed & valid.unsqueeze(2)
    if groups > 1:
        allowed = allowed.repeat_interleave(groups, dim=1)
    if not additive:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def key_validity(mask, q_len: int) -> torch.Tensor | None:
    """``(batch, q_len)`` bool: which of the last ``q_len`` keys of the model's mask any query may attend to
    (False = padding); ``None`` when the mask says nothing (no padding)."""
    if mask is None:
        return None
    block = mask[:, 0, :, -q_len:]  # (b, q, q_len): the chunk's queries against the chunk's keys
    allowed = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
    return allowed.any(dim=1)
