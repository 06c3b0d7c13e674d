"""Per-step fidelity of a compressed cache to the full cache, from the two next-token distributions.

Torch only, with no import of the rest of momentkv, so that a peer toolkit's runner in another environment
(``benchmarks/peers/kvpress``) computes exactly the same numbers: it loads this file by path.
"""

from __future__ import annotations

import torch


def step_metrics(ref_logprobs: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, suppressed: list[int]):
    """KL, agreement and NLL of one step.

    ``ref_logprobs`` ``(b, V)``: the full cache's log-probabilities; ``logits`` ``(b, V')``, ``V' >= V``: the
    compressed cache's; ``ref_tokens`` ``(b,)``: the reference tokens. Returns ``(kl, agree, nll)``, each
    ``(b,)``: KL(full || compressed) in nats; whether the two argmaxes agree (``suppressed`` ids, e.g.
    end-of-sequence, excluded from both, as from the reference); ``-log p(reference token)``. Top-1 compares
    the two distributions, not the reference token: with a sampled reference the token drawn is often not
    the argmax of either (with a greedy one they are the same thing).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)[:, : ref_logprobs.shape[-1]]
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)  # (b,)
    agree = _top1(logits[:, : ref_logprobs.shape[-1]], suppressed) == _top1(ref_logprobs, suppressed)
    nll = -logp.gather(-1, ref_tokens.view(-1, 1)).squeeze(-1)
    return kl, agree, nll


def _top1(scores: torch.Tensor, suppressed: list[int]) -> torch.Tensor:
    """``(b,)`` argmax of ``scores`` ``(b, V)`` over the ids not in ``suppressed``."""
    if suppressed:
        scores = scores.index_fill(-1, torch.tensor(suppressed, device=scores.device), float("-inf"))
    return scores.argmax(-1)
