"""Decode-step attention with per-token scoring, in plain torch: the reference the Triton kernel must match.

One decode query per head attends over the cached keys and values. Besides the attention output, the step
returns the attention each cached token receives, averaged over the query heads that share its KV head
(grouped-query attention, never expanded with ``repeat_kv``), and can fold it into Moment-KV's importance
state in place: ``I = alpha * I + a``.
"""

from __future__ import annotations

import torch


def check_decode_args(query, key, value, valid, ema_state, score_start) -> tuple[int, int, int, int, int]:
    """Validate the shapes of a decode-attention call; return ``(batch, heads, kv_heads, S, head_dim)``."""
    if query.dim() != 3 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"expected query (batch, heads, head_dim) and key/value (batch, kv_heads, S, head_dim) of one shape, "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    b, h, d = query.shape
    kb, kv, s, kd = key.shape
    if kb != b or kd != d or kv == 0 or h % kv != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit key {tuple(key.shape)} (heads % kv_heads != 0?)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if valid is not None and (valid.shape != (b, s) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of shape {(b, s)}, got {valid.dtype} {tuple(valid.shape)}")
    if not 0 <= score_start <= s:
        raise ValueError(f"score_start must lie in [0, {s}], got {score_start}")
    if ema_state is not None and (ema_state.shape != (b, kv, s - score_start) or ema_state.dtype != torch.float32):
        raise ValueError(
            f"ema_state must be float32 of shape {(b, kv, s - score_start)}, "
            f"got {ema_state.dtype} {tuple(ema_state.shape)}"
        )
    return b, h, kv, s, d


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    ema_state: torch.Tensor | None = None,
    alpha: float = 1.0,
    score_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of softmax attention plus the attention each cached token receives.

    Args:
        query: ``(batch, heads, head_dim)``, one decode query per head.
        key, value: ``(batch, kv_heads, S, head_dim)``; head ``h`` reads KV head ``h // (heads // kv_heads)``.
        scaling: the softmax scale (``head_dim ** -0.5`` for the supported families).
        valid: ``(batch, S)`` bool, False masks a key out; None attends to every key.
        ema_state: ``(batch, kv_heads, S - score_start)`` float32, updated in place to
            ``alpha * ema_state + attn[..., score_start:]``; None skips the update.
        alpha: the decay of the importance state.
        score_start: the first cached position that carries importance state (e.g. the prompt's end).

    Returns:
        ``out`` ``(batch, heads, head_dim)`` in the input dtype, and ``attn`` ``(batch, kv_heads, S)`` float32,
        the softmax probabilities averaged over each KV head's query group. Both are computed in float32.
        A row whose keys are all masked gives zeros in both (not NaN).
    """
    b, h, kv, s, d = check_decode_args(query, key, value, valid, ema_state, score_start)
    groups = h // kv
    q = query.reshape(b, kv, groups, d).to(torch.float32)  # (b, kv, g, d)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)) * scaling  # (b, kv, g, S)
    if valid is not None:
        logits = logits.masked_fill(~valid.view(b, 1, 1, s), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (b, kv, g, S)
    if valid is not None:  # all keys masked: softmax gives NaN, the contract says zeros
        probs = probs.masked_fill(~valid.any(dim=-1).view(b, 1, 1, 1), 0.0)
    out = torch.matmul(probs, value.to(torch.float32))  # (b, kv, g, d)
    attn = probs.mean(dim=2)  # (b, kv, S)
    if ema_state is not None:
        ema_state.mul_(alpha).add_(attn[..., score_start:])
    return out.reshape(b, h, d).to(query.dtype), attn
