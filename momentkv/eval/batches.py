"""Prompts grouped into left-padded batches; every pass over the prompts uses the same grouping.

The same grouping matters: a prompt is computed with the same neighbours, padding and kernels under every
policy, so a policy that never evicts reproduces the reference bit for bit (KL exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momentkv.eval.stepping import left_pad


@dataclass(frozen=True)
class Batch:
    rows: list[int]  # indices into the prompt list
    input_ids: torch.Tensor  # (b, longest), left-padded
    attention_mask: torch.Tensor  # (b, longest)


def make_batches(encoded: list[list[int]], batch_size: int, pad_id: int, device="cpu") -> list[Batch]:
    """Group prompts ``batch_size`` at a time, longest first so that rows of similar length share padding."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], pad_id, device)
        batches.append(Batch(rows=rows, input_ids=ids, attention_mask=mask))
    return batches
