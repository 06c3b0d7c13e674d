"""Grouped-query attention without ``repeat_kv``: the one place momentkv computes softmax attention itself.

Grouped-query attention shares one KV head among ``groups = heads / kv_heads`` query heads. Reshaping the
queries to ``(batch, kv_heads, groups * q, head_dim)`` lets one matmul against the un-expanded keys
``(batch, kv_heads, S, head_dim)`` produce every query head's logits. Everything that needs attention
probabilities uses :func:`grouped_probs`: the decode step's output and scores (:func:`attend`), the scores
alone (:func:`group_attention`), the attention of a window of queries (prefill compressors, windowed scorers)
and the kernels' torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Logits:
    """How a family's attention turns ``q . k`` into probabilities, where a scale is not all of it.

    ``scaling`` multiplies ``q . k``; ``softcap`` (Gemma 2) then caps the logits smoothly, ``tanh(l / cap) * cap``,
    before the mask; ``sinks`` (GPT-OSS, ``(heads,)``) are learned logits, one per query head, that join each
    softmax's denominator: they take probability mass but are not keys, so no cached token stands for them and
    the probabilities over the keys sum to less than one. Every function here taking ``scaling`` takes a
    :class:`Logits` too (see :func:`logit_rule`).
    """

    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None


def logit_rule(scaling: float, softcap: float | None = None, sinks: torch.Tensor | None = None):
    """``scaling`` itself when nothing else shapes the logits (the float path, unchanged), else a :class:`Logits`."""
    if softcap is None and sinks is None:
        return scaling
    return Logits(float(scaling), None if softcap is None else float(softcap), sinks)


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float | Logits) -> torch.Tensor:
    """Scaled logits ``(batch, kv_heads, groups, q, S)`` float32 of ``query`` ``(b, heads, q, d)`` against ``key``,
    soft-capped when ``scaling`` is a :class:`Logits` with a ``softcap``."""
    b, h, q, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    groups = h // kv
    grouped = query.reshape(b * kv, groups * q, d)
    keys = key.reshape(b * kv, s, d)
    if query.dtype != torch.float32:
        # Half-precision logits lose the softmax its accuracy (and q.k may pass float16's 65504): accumulate
        # in float32, as SDPA's CPU kernel does.
        grouped, keys = grouped.float(), keys.float()
    rule = scaling if isinstance(scaling, Logits) else None
    scale = rule.scaling if rule is not None else scaling
    logits = torch.bmm(grouped, keys.transpose(1, 2)).mul_(scale)  # one batched matmul, no broadcasting
    if rule is not None and rule.softcap is not None:
        logits = logits.div_(rule.softcap).tanh_().mul_(rule.softcap)
    return logits.view(b, kv, groups, q, s)


def _apply_mask(logits: torch.Tensor, mask) -> torch.Tensor:
    """Mask ``logits`` ``(b, kv, g, q, S)`` with a model mask ``(b or 1, 1 or heads, >= q, S)``: bool (True =
    attend) or additive float; its last ``q`` query rows are used."""
    if mask is None:
        return logits
    b, kv, g, q, s = logits.shape
    m = mask[..., -q:, :]
    m = m.reshape(m.shape[0], kv, g, q, s) if m.shape[1] == kv * g and kv * g > 1 else m.unsqueeze(1)
    if m.dtype == torch.bool:
        return logits.masked_fill_(~m, float("-inf"))
    return logits.add_(m.to(torch.float32))


def grouped_probs(query: torch.Tensor, key: torch.Tensor, mask, scaling: float | Logits,
                  rows_may_be_empty: bool = False) -> torch.Tensor:
    """Softmax attention ``(batch, kv_heads, groups, q, S)`` float32 of every query head.

    Args:
        query: ``(batch, heads, q, head_dim)``.
        key: ``(batch, kv_heads, S, head_dim)``.
        mask: ``None``, a bool mask (True = attend) or an additive float mask shaped
            ``(batch or 1, 1 or heads, >= q, S)``.
        scaling: the softmax scale, or a :class:`Logits` (soft-capping, sinks).
        rows_may_be_empty: True where a query may see no key at all (a padding query): its row is zeros, not
            NaN. A decode query always sees itself, and takes the single-kernel ``torch.softmax``.
    """
    logits = _apply_mask(grouped_logits(query, key, scaling), mask)
    sinks = scaling.sinks if isinstance(scaling, Logits) else None
    if sinks is not None:  # each head's sink logit joins the denominator, as a key that is never stored
        b, kv, g = logits.shape[:3]
        sink = sinks.detach().to(device=logits.device, dtype=torch.float32).view(1, kv, g, 1, 1)
        peak = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)  # finite: a row that sees no key gives 0
        weights = (logits - peak).exp_()
        return weights.div_(weights.sum(dim=-1, keepdim=True).add_((sink - peak).exp()))
    if not rows_may_be_empty:
        return torch.softmax(logits, dim=-1)
    peak = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    weights = (logits - peak).exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny))


def group_mean(probs: torch.Tensor) -> torch.Tensor:
    """``(b, kv, g, S)`` -> ``(b, kv, S)``: the mean over each KV head's query group, as a sum and a scale
    (``mean`` over a middle axis is several times slower than ``sum`` on these small tensors)."""
    return probs.sum(dim=2).mul_(1.0 / probs.shape[2])


def group_attention(query: torch.Tensor, key: torch.Tensor, mask, scaling: float | Logits,
                    rows_may_be_empty: bool = False) -> torch.Tensor:
    """Softmax attention of the last query, averaged over each GQA group: ``(batch, kv_heads, S)`` float32.

    ``query`` ``(batch, heads, >= 1, head_dim)``; see :func:`grouped_probs` for the other arguments. Each row
    sums to 1 over the unmasked keys (less with sinks: the sinks' share is no token's).
    """
    return group_mean(grouped_probs(query[:, :, -1:], key, mask, scaling, rows_may_be_empty)[:, :, :, 0])


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scaling: float | Logits,
           rows_may_be_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and probabilities in one pass over the keys.

    Returns ``out`` ``(batch, q, heads, head_dim)`` in ``value``'s dtype (the layout the attention modules
    expect) and ``probs`` ``(batch, kv_heads, groups, q, S)`` float32. The output is ``probs @ V`` per KV
    group, accumulated in float32: within float tolerance of SDPA, not bit-identical to it.
    """
    probs = grouped_probs(query, key, mask, scaling, rows_may_be_empty)  # (b, kv, g, q, S)
    b, kv, g, q, s = probs.shape
    v = value.reshape(b * kv, s, value.shape[-1])
    v = v if v.dtype == torch.float32 else v.to(torch.float32)
    out = torch.bmm(probs.view(b * kv, g * q, s), v)  # (b*kv, g*q, d)
    out = out.view(b, kv * g, q, -1).transpose(1, 2)  # (b, q, heads, d); head = kv_idx * g + group_idx
    return out.to(value.dtype), probs
