"""StreamingLLM on the prompt: keep the first ``sinks`` tokens and the newest ones (Xiao et al., arXiv 2309.17453).

The first tokens of a sequence draw attention regardless of their content ("attention sinks"); a window of
the most recent tokens holds the local context. Of ``capacity`` tokens, ``sinks`` go to the first real
tokens of each row and the remaining ``capacity - sinks`` to the last prompt tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field

from momentkv.prefill.base import BudgetedCompressor, PrefillContext, keep_top, register_prefill


@register_prefill("streamingllm")
class StreamingLLM(BudgetedCompressor):
    """Keep the first ``sinks`` real prompt tokens and the last ``capacity - sinks``."""

    sinks: int = Field(4, ge=0, description="The first real prompt tokens always kept (attention sinks).")

    def select(self, ctx: PrefillContext, capacity: int) -> torch.Tensor:
        """``(batch, kv_heads, capacity)`` indices. Scores: sinks above everything (earliest first), then by
        position (newest first)."""
        b, kv, s, _ = ctx.keys.shape
        position = torch.arange(s, device=ctx.keys.device, dtype=torch.float32).expand(b, s)  # (b, S)
        real_rank = ctx.valid.long().cumsum(-1) - 1  # (b, S): index among the row's real tokens
        sink = ctx.valid & (real_rank < self.sinks)
        scores = torch.where(sink, 2.0 * s - real_rank.float(), position)  # (b, S)
        return keep_top(scores.unsqueeze(1).expand(b, kv, s), ctx.valid, capacity)
