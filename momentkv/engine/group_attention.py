"""The attention each cached token receives, per KV head, averaged over its query group, without repeat_kv.

Grouped-query attention shares one KV head among ``groups = heads / kv_heads`` query heads. Reshaping the
queries to ``(batch, kv_heads, groups * q, head_dim)`` lets one matmul against the un-expanded keys
``(batch, kv_heads, S, head_dim)`` produce every query head's logits.
"""

from __future__ import annotations

import torch


def _masked_logits(query: torch.Tensor, key: torch.Tensor, mask, scaling: float) -> torch.Tensor:
    """Logits ``(batch, kv_heads, groups, q, S)`` float32 with the attention mask applied."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    groups = h // kv
    grouped = query.reshape(b, kv, groups * q, d)
    if query.dtype == torch.float16:
        # The unscaled q.k can pass float16's maximum (65504) where the scaled logit does not (SDPA scales
        # first too): scale the query before the matmul, or the scores turn inf and then NaN.
        logits = torch.matmul(grouped * scaling, key.transpose(-1, -2)).to(torch.float32)
    else:
        logits = torch.matmul(grouped, key.transpose(-1, -2)).to(torch.float32).mul_(scaling)
    logits = logits.view(b, kv, groups, q, key.shape[2])
    if mask is not None:
        m = mask[..., -q:, :]  # (b or 1, 1 or heads, q, S)
        m = m.reshape(m.shape[0], kv, groups, q, m.shape[-1]) if m.shape[1] == h else m.unsqueeze(1)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, float("-inf"))
        else:
            logits = logits + m.to(torch.float32)
    return logits


def _softmax(logits: torch.Tensor, rows_may_be_empty: bool = True) -> torch.Tensor:
    """Softmax over the last axis. A row masked everywhere gives zeros when ``rows_may_be_empty``; a decode
    query always sees itself, so it takes ``torch.softmax`` (one kernel: the fastest on a quiet CPU)."""
    if not rows_may_be_empty:
        return torch.softmax(logits, dim=-1)
    peak = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    weights = (logits - peak).exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny))


def _group_mean(probs: torch.Tensor) -> torch.Tensor:
    """Average over the query-group axis (2) as a sum and a scale: ``mean`` over a middle axis is several
    times slower than ``sum`` on these small tensors."""
    return probs.sum(dim=2).mul_(1.0 / probs.shape[2])


def group_attention(query: torch.Tensor, key: torch.Tensor, mask, scaling: float,
                    rows_may_be_empty: bool = False) -> torch.Tensor:
    """Softmax attention of the last query, averaged over each GQA group.

    Args:
        query: ``(batch, heads, 1, head_dim)``.
        key: ``(batch, kv_heads, S, head_dim)``.
        mask: ``None``, a bool mask (True = attend) or an additive float mask, shaped
            ``(batch, 1 or heads, >= 1, S)``; its last query row is used.
        scaling: the softmax scale (``head_dim ** -0.5`` for these families).
        rows_may_be_empty: True where the query may see no key at all (the last prompt query of a row that is
            padding from end to end): such rows give zeros, not NaN. A decode query always sees itself.

    Returns:
        ``(batch, kv_heads, S)`` float32; each row sums to 1 over the unmasked keys.
    """
    logits = _masked_logits(query, key, mask, scaling)  # (b, kv, g, 1, S)
    probs = _softmax(logits, rows_may_be_empty=rows_may_be_empty)
    return _group_mean(probs).squeeze(2)
