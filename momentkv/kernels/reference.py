"""Decode-step attention with per-token scores, in plain torch: the reference the Triton kernel must match.

One decode query per head attends over the cached keys and values. Besides the attention output, the step
returns the attention each cached token receives, averaged over the query heads that share its KV head
(grouped-query attention, never expanded with ``repeat_kv``): what the engine hands the scorers.

There is no second softmax here: the reference is the engine's own grouped attention
(:func:`momentkv.core.group_attention.attend`) run on float32 copies of the inputs, so the kernel is tested
against exactly what the engine computes on the CPU.
"""

from __future__ import annotations

import torch

from momentkv.core.group_attention import attend, group_mean, logit_rule


def check_decode_args(query, key, value, valid, sinks=None) -> tuple[int, int, int, int, int]:
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
    if sinks is not None and (sinks.shape != (h,) or not sinks.is_floating_point()):
        raise ValueError(f"sinks must be a float tensor of shape {(h,)} (one per query head), got "
                         f"{sinks.dtype} {tuple(sinks.shape)}")
    return b, h, kv, s, d


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of softmax attention plus the attention each cached token receives.

    Args:
        query: ``(batch, heads, head_dim)``, one decode query per head.
        key, value: ``(batch, kv_heads, S, head_dim)``; head ``h`` reads KV head ``h // (heads // kv_heads)``.
        scaling: the softmax scale (``head_dim ** -0.5`` for the supported families).
        valid: ``(batch, S)`` bool, False masks a key out; None attends to every key.
        softcap: Gemma 2's soft-capping, ``cap * tanh(l / cap)`` of the scaled logits before the mask; None: none.
        sinks: GPT-OSS's learned sinks, ``(heads,)`` float, one logit per query head that joins its softmax's
            denominator (no key, no value): the probabilities over the keys then sum to less than one.

    Returns:
        ``out`` ``(batch, heads, head_dim)`` in the input dtype, and ``attn`` ``(batch, kv_heads, S)`` float32,
        the softmax probabilities averaged over each KV head's query group. Both are computed in float32.
        A row whose keys are all masked gives zeros in both (not NaN), with or without sinks.
    """
    b, h, kv, s, d = check_decode_args(query, key, value, valid, sinks)
    mask = None if valid is None else valid.view(b, 1, 1, s)  # one mask row shared by every head
    out, probs = attend(
        query.to(torch.float32).unsqueeze(2),  # (b, h, 1, d)
        key.to(torch.float32),
        value.to(torch.float32),
        mask,
        logit_rule(scaling, softcap, sinks),
        rows_may_be_empty=valid is not None,  # a masked-out batch row gives zeros, as the kernel does
    )  # out (b, 1, h, d), probs (b, kv, g, 1, S)
    return out[:, 0].to(query.dtype), group_mean(probs[:, :, :, 0])
