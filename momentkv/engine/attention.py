"""The attention functions momentkv registers with transformers: the model's own, plus scoring.

One function per underlying implementation (SDPA, or a family's eager function). When the cache layer's
``update`` left its step record in the call's kwargs (see :mod:`~momentkv.engine.step`), the function asks
the layer for the mask (``step_mask``), attends, and hands the layer the step once (``observe``). A decode
step whose record says its scorers need the attention computes it with the output:

- SDPA on the CPU (and wherever the fused kernel does not apply): grouped logits, softmax, and the output as
  ``probs @ V`` per KV group (:func:`~momentkv.core.group_attention.attend`), within float tolerance of SDPA;
- SDPA on CUDA with triton installed: the fused Triton kernel of ``momentkv.kernels``, one pass over the keys
  and values for both (``MOMENTKV_FUSED=0``, read once at import, turns it off);
- eager attention: the family's own function, whose returned weights are the attention.

Every other call (the prompt, a layer that does not score, a cache whose budget will not be reached) runs the
model's implementation unchanged, so outputs are bit-identical to the unpatched model.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from momentkv.core.group_attention import Logits, attend, group_mean, logit_rule
from momentkv.engine.step import STEP_KWARG
from momentkv.errors import PolicyError
from momentkv.kernels import fused_decode_attention, triton_available

PREFIX = "momentkv"
FUSED_ENABLED = os.environ.get("MOMENTKV_FUSED", "1") != "0"


def _fused_applies(query, mask) -> bool:
    """The fused kernel serves single-query steps on CUDA whose mask is shared by all heads."""
    return (
        FUSED_ENABLED
        and query.is_cuda
        and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1))
        and triton_available()
    )


def _fused_step(query, key, value, mask, logits):
    """Attention output ``(b, 1, heads, d)`` and the attention per cached token from the Triton kernel.
    ``logits``: the scale, or a :class:`Logits` whose soft-capping and sinks the kernel applies too."""
    valid = None if mask is None else mask[:, 0, -1, :].expand(query.shape[0], key.shape[2])
    rule = logits if isinstance(logits, Logits) else Logits(logits)
    out, attention = fused_decode_attention(query[:, :, 0], key, value, rule.scaling, valid=valid,
                                            softcap=rule.softcap, sinks=rule.sinks)
    return out.unsqueeze(1), attention


# Keys beyond the query with no momentkv layer attached: the model holds a cache that momentkv does not bound
# (a forward given no cache creates a DynamicCache). generate() refuses such a cache; so does a manual loop.
_FOREIGN_CACHE = (
    "a patched model attended to {} cached tokens without momentkv's step record: the cache is not momentkv's "
    "(a forward given no cache creates a DynamicCache, which would grow without bound: give manual forward loops "
    "handle.new_cache() as their cache, or use model.generate(); to run with a full cache, handle.remove() first), "
    "or this transformers version no longer hands the kwargs of cache.update to the attention function "
    "(momentkv needs transformers >= 5.24)"
)


def make_attention_function(base: Callable, additive_mask: bool, single_pass: bool) -> Callable:
    """Wrap ``base`` (an attention function of transformers' signature) with momentkv's scoring.

    ``single_pass``: decode steps that need the attention compute output and attention together (SDPA);
    otherwise ``base`` returns the weights itself (eager).
    """

    def momentkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        step = kwargs.pop(STEP_KWARG, None)  # what the layer's update decided (see momentkv.engine.step)
        if step is None:
            if key.shape[2] > query.shape[2]:
                raise PolicyError(_FOREIGN_CACHE.format(key.shape[2] - query.shape[2]))
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer = step.layer
        scaling = module.scaling if scaling is None else scaling
        # What momentkv computes itself honours the family's soft-capping and sinks (the base gets its keywords).
        logits = logit_rule(scaling, kwargs.get("softcap"), kwargs.get("s_aux"))
        mask = layer.step_mask(attention_mask, query, key, additive_mask)
        if step.needs_attention and not (dropout and module.training):
            if not single_pass:  # eager: the weights are the attention, already computed
                output, weights = base(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
                b, heads, _, s = weights.shape
                attention = group_mean(weights[:, :, -1].float().view(b, key.shape[1], -1, s))
                layer.observe(query, key, mask, logits, attention)
                return output, weights
            if _fused_applies(query, mask):  # soft-capping and sinks included
                output, attention = _fused_step(query, key, value, mask, logits)
            else:
                output, probs = attend(query, key, value, mask, logits)
                attention = group_mean(probs[:, :, :, -1])
            layer.observe(query, key, mask, logits, attention)
            return output, None
        output, weights = base(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        layer.observe(query, key, mask, logits)
        return output, weights

    momentkv_attention.__qualname__ = momentkv_attention.__name__ = f"momentkv_{base.__name__}"
    return momentkv_attention


def register_attention(base_implementation: str, family: str, eager_function: Callable) -> str:
    """Register (once) the attention and mask functions for ``base_implementation``; return their name."""
    if base_implementation == "sdpa":
        name, base, mask, additive, single = f"{PREFIX}_sdpa", sdpa_attention_forward, sdpa_mask, False, True
    else:
        name, base, mask, additive, single = f"{PREFIX}_eager_{family}", eager_function, eager_mask, True, False
    if name not in AttentionInterface():
        AttentionInterface.register(name, make_attention_function(base, additive, single))
        AttentionMaskInterface.register(name, mask)
    return name
