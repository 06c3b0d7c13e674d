"""How much a generated text repeats itself: the share of its n-grams that occurred earlier in it.

``rep-n = 1 - distinct n-grams / n-grams`` (the sequence-level repetition of Welleck et al., "Neural Text
Generation with Unlikelihood Training", arXiv 1908.04319, there called seq-rep-n). 0 for a text that never
repeats an n-gram; close to 1 for a text stuck in a loop. A looping reference is easy to continue from a few
recent tokens, so it flatters every eviction policy: the report prints each reference's rep-n beside the KL.
"""

from __future__ import annotations

import torch

REPETITION_N = 4  # 4-grams: a repeated 4-token phrase is rare in fluent text, common in loops


def repeated_ngram_share(tokens, n: int = REPETITION_N) -> float:
    """rep-n of one token sequence (any iterable of ints); NaN when it is shorter than ``n``."""
    seq = [int(t) for t in tokens]
    total = len(seq) - n + 1
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if total <= 0:
        return float("nan")
    distinct = len({tuple(seq[i:i + n]) for i in range(total)})
    return 1.0 - distinct / total


def repetition_per_prompt(tokens: torch.Tensor, n: int = REPETITION_N) -> torch.Tensor:
    """``(P,)`` float64 rep-n of each row of ``tokens`` ``(P, N)``."""
    return torch.tensor([repeated_ngram_share(row.tolist(), n) for row in tokens], dtype=torch.float64)
