"""Teacher-forced replay: the reference tokens forced through the model under a policy, one forward per token.

Per step and prompt: KL(full || policy) of the next-token distributions, top-1 agreement (the policy's
argmax, end-of-sequence suppressed as in the reference, equals the reference token) and the reference
token's negative log-likelihood under the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import momentkv
from momentkv.eval.batches import Batch
from momentkv.eval.reference import Reference
from momentkv.eval.stepping import run_steps, suppress


@dataclass
class StepMetrics:
    kl: torch.Tensor  # (prompts, steps) float64, KL(full || policy) in nats
    agree: torch.Tensor  # (prompts, steps) bool, policy's argmax == reference token
    nll: torch.Tensor  # (prompts, steps) float64, -log p_policy(reference token)
    active_from: torch.Tensor  # (prompts,) long, first step whose logits saw an eviction (steps: never)
    kv_bytes: int  # stored keys and values after the last step, summed over batches
    stored: int  # stored tokens over layers after the last step, summed over batches


def step_metrics(ref_logprobs: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, suppressed: list[int]):
    """KL, agreement and NLL for one step: ``ref_logprobs`` ``(b, V)``, ``logits`` ``(b, V)``, ``ref_tokens`` ``(b,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, : ref_logprobs.shape[-1]]
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)  # (b,)
    agree = suppress(logits, suppressed).argmax(-1) == ref_tokens
    nll = -logp.gather(-1, ref_tokens.view(-1, 1)).squeeze(-1)
    return kl, agree, nll


def teacher_forced(model, policy, batches: list[Batch], reference: Reference, progress=None) -> StepMetrics:
    """Replay ``reference`` under ``policy`` (anything ``momentkv.patch`` takes)."""
    prompts, steps = reference.tokens.shape
    kl = torch.zeros((prompts, steps), dtype=torch.float64)
    agree = torch.zeros((prompts, steps), dtype=torch.bool)
    nll = torch.zeros((prompts, steps), dtype=torch.float64)
    active_from = torch.full((prompts,), steps, dtype=torch.long)
    kv_bytes = stored = 0
    with momentkv.patched(model, policy) as handle:
        for batch in batches:
            rows = torch.tensor(batch.rows)
            ref_tokens = reference.tokens[rows].to(batch.input_ids.device)  # (b, steps)
            cache = handle.new_cache()
            for step, logits, evicted in run_steps(model, cache, batch.input_ids, batch.attention_mask, steps,
                                                   lambda s, _: ref_tokens[:, s]):
                ref_lp = reference.logprobs[rows, step].to(logits.device)
                k, a, n = step_metrics(ref_lp, logits, ref_tokens[:, step], reference.suppressed)
                kl[rows, step], agree[rows, step], nll[rows, step] = k.double().cpu(), a.cpu(), n.double().cpu()
                if evicted:
                    active_from[rows] = torch.minimum(active_from[rows], torch.tensor(step))
                if progress is not None:
                    progress.update(len(batch.rows))
            stats = cache.stats()
            kv_bytes += stats["kv_bytes"]
            stored += stats["stored"]
    return StepMetrics(kl=kl, agree=agree, nll=nll, active_from=active_from, kv_bytes=kv_bytes, stored=stored)
