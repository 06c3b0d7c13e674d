"""The attention functions momentkv registers with transformers: the model's own, plus scoring.

One function per underlying implementation (SDPA, or a family's eager function). It computes the output by
calling that implementation unchanged, so outputs are bit-identical to the unpatched model while nothing
is evicted; when the cache layer attached itself to the call (see ``EvictingLayer.update``), it also hands
the layer this step's query so that the scorers see the attention each cached token receives.

On CUDA, with triton installed, decode steps of the SDPA variant instead run the fused Triton kernel of
``momentkv.kernels``: the output and the attention per cached token in one pass over the keys and values
(close to SDPA's output, not bit-identical). ``MOMENTKV_FUSED=0`` keeps SDPA plus separate scoring.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from momentkv.kernels import fused_decode_attention, triton_available

PREFIX = "momentkv"


def _fused_enabled() -> bool:
    return os.environ.get("MOMENTKV_FUSED", "1") != "0"


def _fused_applies(layer, query, mask) -> bool:
    """The fused kernel serves single-query decode steps on CUDA whose mask is shared by all heads."""
    return (
        query.is_cuda
        and query.shape[2] == 1
        and not layer.in_prefill
        and layer.plan.needs_attention
        and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1))
        and _fused_enabled()
        and triton_available()
    )


def _fused_step(layer, query, key, value, mask, scaling):
    """Attention output and the attention per cached token from one pass of the Triton kernel."""
    valid = None if mask is None else mask[:, 0, -1, :].expand(query.shape[0], key.shape[2])
    out, attention = fused_decode_attention(query[:, :, 0], key, value, scaling, valid=valid)
    layer.update_scores(attention)
    return out.unsqueeze(1), None  # (batch, 1, heads, head_dim), as the model expects


def make_attention_function(base: Callable, additive_mask: bool, fused: bool = False) -> Callable:
    """Wrap ``base`` (an attention function of transformers' signature) with momentkv's scoring.

    With ``fused``, decode steps on CUDA run the Triton kernel of ``momentkv.kernels`` (attention and scoring
    in one pass over the keys and values) when triton is installed; ``MOMENTKV_FUSED=0`` turns it off.
    """

    def momentkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = kwargs.pop("momentkv_layer", None)
        if layer is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mask = layer.attention_mask(attention_mask, query, key, additive_mask)
        if fused and _fused_applies(layer, query, mask):
            return _fused_step(layer, query, key, value, mask, module.scaling if scaling is None else scaling)
        if layer.timer is None:
            output, weights = base(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        else:  # benchmarking: time the kernel itself
            start = time.perf_counter()
            output, weights = base(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
            layer.timer.attention += time.perf_counter() - start
        layer.observe(query, key, mask, module.scaling if scaling is None else scaling)
        return output, weights

    momentkv_attention.__qualname__ = momentkv_attention.__name__ = f"momentkv_{base.__name__}"
    return momentkv_attention


def register_attention(base_implementation: str, family: str, eager_function: Callable) -> str:
    """Register (once) the attention and mask functions for ``base_implementation``; return their name."""
    if base_implementation == "sdpa":
        name, base, mask, additive, fused = f"{PREFIX}_sdpa", sdpa_attention_forward, sdpa_mask, False, True
    else:
        name, base, mask, additive, fused = f"{PREFIX}_eager_{family}", eager_function, eager_mask, True, False
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, make_attention_function(base, additive, fused))
        AttentionMaskInterface.register(name, mask)
    return name
