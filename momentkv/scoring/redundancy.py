"""R-KV's redundancy of each cached key among the others (Cai et al., arXiv 2505.24133).

Reasoning traces repeat themselves; a token whose key closely resembles many others adds little. Per
(batch row, KV head), over the ``n`` evictable tokens:

1. ``S = cos(k_i, k_j)``, with ``S_ii = 0``;
2. for each token ``i`` that has near-duplicates (``S_ij > threshold``), the entry of its most recent one
   (``retain: last``; ``first``: its oldest) is zeroed, so that among copies the newest one survives;
3. ``redundancy_j = softmax_j(mean_i S_ij)``.

The scorer returns ``-redundancy`` (higher means keep), so R-KV's ``lambda * importance - (1 - lambda) *
redundancy`` is ``{type: instantaneous, ..., weight: lambda}`` plus ``{type: redundancy, weight: 1 - lambda}``.

Deviations from R-KV's code: "most recent" is read from the tokens' positions (slots are not in sequence
order once eviction has reused them); a token with no near-duplicate keeps its whole row (the code, which
writes "none" as index 0, zeroes that row's entry of the first cached token instead); only the evictable
tokens are compared (R-KV compresses the whole cache, the prompt included).

Cost: an ``n x n`` similarity per (row, KV head), ``O(n^2 d)``. It runs only when the layer ranks its tokens
(``every_step() == False``), so ``cadence: k`` divides its cost by ``k``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer


def cosine_matrix(keys: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, n, n)`` float32 cosine similarities of ``keys`` ``(batch, kv_heads, n, d)``."""
    unit = keys.float()
    unit = unit / (torch.linalg.vector_norm(unit, dim=-1, keepdim=True) + 1e-8)
    return unit @ unit.transpose(-1, -2)


@register_scorer("redundancy")
class Redundancy(Scorer):
    """``-redundancy``: R-KV's softmax over the tokens of each key's mean cosine similarity to the others, the
    entry of each token's newest (or oldest) near-duplicate zeroed first."""

    threshold: float = Field(
        0.5, ge=-1.0, le=1.0, description="Cosine similarity above which two keys are near-duplicates.",
    )
    retain: Literal["last", "first"] = Field(
        "last", description="Which near-duplicate of a token loses its similarity entry: last (the newest copy "
        "survives) or first.",
    )

    needs_attention = False
    batched_now = True

    def every_step(self) -> bool:
        return False

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        n = ctx.keys.shape[-2]
        if n == 0:
            return ctx.keys.new_zeros(ctx.keys.shape[:-1], dtype=torch.float32)
        # Work in sequence order (slots are not, once eviction reused them): "most recent" is then the last index.
        order = ctx.positions.argsort(dim=-1)  # (b, kv, n)
        keys = ctx.keys.gather(-2, order.unsqueeze(-1).expand_as(ctx.keys))
        sim = cosine_matrix(keys)  # (b, kv, n, n): row i, column j
        sim.diagonal(dim1=-2, dim2=-1).zero_()
        near = sim > self.threshold
        near.diagonal(dim1=-2, dim2=-1).fill_(False)
        valid = None if ctx.valid is None else ctx.valid.gather(-1, order)
        if valid is not None:
            pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # padding neither counts nor is counted
            sim.masked_fill_(~pair, 0.0)
            near &= pair
        # Each row's retained near-duplicate: its last (newest) or first (oldest) one; uint8 argmax finds the
        # first maximum, so the newest is the first from the end.
        flags = near.to(torch.uint8)
        if self.retain == "last":
            chosen = (n - 1) - flags.flip(-1).argmax(dim=-1, keepdim=True)
        else:
            chosen = flags.argmax(dim=-1, keepdim=True)
        has_near = near.any(dim=-1, keepdim=True)
        sim.scatter_(-1, chosen, torch.where(has_near, 0.0, sim.gather(-1, chosen)))
        count = n if valid is None else valid.sum(-1, keepdim=True).clamp_min(1)
        mean = sim.sum(dim=-2) / count  # (b, kv, n): column means
        if valid is not None:
            mean = mean.masked_fill(~valid, float("-inf"))
        redundancy = torch.softmax(mean, dim=-1).nan_to_num(0.0)
        return torch.empty_like(redundancy).scatter_(-1, order, -redundancy)  # back to slot order
