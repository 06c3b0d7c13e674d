"""KNorm: keep the prompt keys of smallest L2 norm (Devoto et al., arXiv 2406.11430).

Keys of low norm tend to receive high attention, so the norm ranks tokens without computing any attention.
"""

from __future__ import annotations

import torch

from momentkv.prefill.base import BudgetedCompressor, PrefillContext, keep_top, register_prefill


@register_prefill("knorm")
class KNorm(BudgetedCompressor):
    """Keep the ``capacity`` prompt tokens whose keys have the smallest L2 norm, per KV head."""

    def select(self, ctx: PrefillContext, capacity: int) -> torch.Tensor:
        scores = -torch.linalg.vector_norm(ctx.keys.float(), dim=-1)  # (b, kv, S)
        return keep_top(scores, ctx.valid, capacity)
