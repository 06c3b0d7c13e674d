"""Free-running decoding under a policy, compared token by token with the reference output.

Tokens are chosen as the reference chose them: greedily, or sampled from the same per-prompt streams of
uniform numbers (see :mod:`momentkv.eval.sampling`), so the first divergent step is the policy's doing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import momentkv
from momentkv.eval.batches import Batch
from momentkv.eval.full_cache_reference import Reference
from momentkv.eval.stepping import run_steps


@dataclass
class FreeRun:
    tokens: torch.Tensor  # (prompts, steps) long, the policy's own output (chosen as the reference's were)
    first_divergence: torch.Tensor  # (prompts,) long, first step that differs from the reference (steps: none)
    equal_fraction: torch.Tensor  # (prompts,) float64, share of steps whose token equals the reference's


def compare(tokens: torch.Tensor, reference_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first_divergence, equal_fraction)`` of ``tokens`` against ``reference_tokens``, both ``(P, N)``."""
    equal = tokens == reference_tokens
    steps = tokens.shape[1]
    differs = ~equal
    first = torch.where(differs.any(-1), differs.to(torch.int8).argmax(-1), torch.full_like(differs[:, 0], steps, dtype=torch.long))
    return first.long(), equal.double().mean(-1)


def free_run_of(tokens: torch.Tensor, reference_tokens: torch.Tensor) -> FreeRun:
    """A :class:`FreeRun` of the policy's ``tokens`` ``(P, N)`` compared with ``reference_tokens``."""
    first, fraction = compare(tokens, reference_tokens)
    return FreeRun(tokens=tokens, first_divergence=first, equal_fraction=fraction)


def free_running(model, policy, batches: list[Batch], reference: Reference, progress=None) -> FreeRun:
    """Generation of as many tokens as the reference, under ``policy`` (anything ``momentkv.patch`` takes, or
    a function of a :class:`Batch` returning one: a policy per prompt)."""
    prompts, steps = reference.tokens.shape
    tokens = torch.zeros((prompts, steps), dtype=torch.long)
    chooser = reference.chooser()
    for batch in batches:
        with momentkv.patched(model, policy(batch) if callable(policy) else policy) as handle:
            rows = torch.tensor(batch.rows)
            chosen = {}

            def pick(step, logits):
                return chosen[step]

            for step, logits, _ in run_steps(model, handle.new_cache(), batch.input_ids, batch.attention_mask,
                                             steps, pick):
                chosen[step] = chooser.choose(step, logits, batch.rows)
                tokens[rows, step] = chosen[step].cpu()
                if progress is not None:
                    progress.update(len(batch.rows))
    return free_run_of(tokens, reference.tokens.cpu())
