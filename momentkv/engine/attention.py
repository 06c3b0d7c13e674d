"""The attention functions momentkv registers with transformers: the model's own, plus scoring.

One function per underlying implementation (SDPA, or a family's eager function). It computes the output by
calling that implementation unchanged, so outputs are bit-identical to the unpatched model while nothing
is evicted; when the cache layer attached itself to the call (see ``EvictingLayer.update``), it also hands
the layer this step's query so that the scorers see the attention each cached token receives.
"""

from __future__ import annotations

import time
from typing import Callable

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

PREFIX = "momentkv"


def make_attention_function(base: Callable, additive_mask: bool) -> Callable:
    """Wrap ``base`` (an attention function of transformers' signature) with momentkv's scoring."""

    def momentkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = kwargs.pop("momentkv_layer", None)
        if layer is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mask = layer.attention_mask(attention_mask, query, key, additive_mask)
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
        name, base, mask, additive = f"{PREFIX}_sdpa", sdpa_attention_forward, sdpa_mask, False
    else:
        name, base, mask, additive = f"{PREFIX}_eager_{family}", eager_function, eager_mask, True
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, make_attention_function(base, additive))
        AttentionMaskInterface.register(name, mask)
    return name
