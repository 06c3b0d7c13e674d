"""Pooling of token scores over neighbouring tokens, shared by SnapKV (prefill) and windowed scorers (decode).

A token next to an important one survives with it: scores ``(..., tokens)`` are max- or average-pooled with an
odd kernel, stride 1, so the pooled scores stay aligned with the tokens. Both users sit above this module
(``momentkv.prefill.snapkv``, ``momentkv.scoring.observation``), neither above the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_tokens(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Pool ``scores`` ``(..., tokens)`` along the tokens with an odd ``kernel``, stride 1, same length out."""
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(flat, kernel_size=kernel, stride=1, padding=kernel // 2).view(scores.shape)


def odd_kernel(value: int) -> int:
    """Field check shared by every pooling kernel: odd, so the pooled scores stay aligned with the tokens."""
    if value % 2 == 0:
        raise ValueError(f"kernel must be odd so the pooled scores stay aligned with the tokens, got {value}")
    return value
