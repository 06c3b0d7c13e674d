"""Kernels for a decode step: attention and the attention each cached token receives, in one pass.

``fused_decode_attention`` is the entry point. It runs the fused Triton kernel on CUDA tensors when triton is
installed (``pip install momentkv[triton]``) and the torch reference otherwise; both have one contract:

    out, attn = fused_decode_attention(query, key, value, scaling, valid=None, *, softcap=None, sinks=None)

    query      (batch, heads, head_dim)             one decode query per head
    key/value  (batch, kv_heads, S, head_dim)       not expanded; heads = kv_heads * groups
    valid      (batch, S) bool or None              False masks a key out
    softcap    float or None                        Gemma 2: cap * tanh(l / cap) of the scaled logits, before the mask
    sinks      (heads,) float or None               GPT-OSS: one logit per query head joining its softmax denominator
    out        (batch, heads, head_dim)             input dtype
    attn       (batch, kv_heads, S)                 float32, probabilities averaged over each query group

The scorers' state is not the kernel's business: the engine hands ``attn`` to the cache layer, whose scorers
fold it in.

Triton is imported only when a CUDA call needs it, so ``import momentkv`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from momentkv.kernels.reference import decode_attention_reference

__all__ = ["decode_attention_reference", "fused_decode_attention", "triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed and the fused kernel module imports."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import momentkv.kernels.triton_decode  # noqa: F401
    except Exception:  # blocked, broken or mismatched triton install: stay on the torch path
        return False
    return True


def fused_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention and the group-averaged attention per cached token.

    Dispatches to the Triton kernel for CUDA tensors when triton is available, else to
    :func:`decode_attention_reference`; see the module docstring for shapes.
    """
    if query.is_cuda and triton_available():
        from momentkv.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(query, key, value, scaling, valid, softcap=softcap, sinks=sinks)
    return decode_attention_reference(query, key, value, scaling, valid, softcap=softcap, sinks=sinks)
