"""Teacher-forced replay: the reference tokens forced through the model under a policy, one forward per token.

Per step and prompt: KL(full || policy) of the next-token distributions, top-1 agreement (the policy's
argmax equals the full cache's, end-of-sequence suppressed in both as in the reference) and the reference
token's negative log-likelihood under the policy. After each batch the cache's stored slots are read and
checked against the policy's budget (:mod:`momentkv.eval.memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import momentkv
from momentkv.eval.batches import Batch
from momentkv.eval.memory import check_stored
from momentkv.eval.metrics import step_metrics
from momentkv.eval.full_cache_reference import Reference
from momentkv.eval.stepping import run_steps


@dataclass
class StepMetrics:
    kl: torch.Tensor  # (prompts, steps) float64, KL(full || policy) in nats
    agree: torch.Tensor  # (prompts, steps) bool, policy's argmax == the full cache's argmax
    nll: torch.Tensor  # (prompts, steps) float64, -log p_policy(reference token)
    active_from: torch.Tensor  # (prompts,) long, first step whose logits saw an eviction (steps: never)
    kv_bytes: int  # stored keys and values after the last step, summed over batches
    stored: int  # stored tokens over layers after the last step, summed over batches
    slots: torch.Tensor | None = None  # (prompts,) float64, slots per layer after the last step (mean over layers)
    generated_slots: torch.Tensor | None = None  # (prompts,) float64, of which generated tokens


def teacher_forced(model, policy, batches: list[Batch], reference: Reference, progress=None,
                   label: str = "policy") -> StepMetrics:
    """Replay ``reference`` under ``policy`` (anything ``momentkv.patch`` takes, or a function of a
    :class:`Batch` returning one: a policy per prompt)."""
    prompts, steps = reference.tokens.shape
    kl = torch.zeros((prompts, steps), dtype=torch.float64)
    agree = torch.zeros((prompts, steps), dtype=torch.bool)
    nll = torch.zeros((prompts, steps), dtype=torch.float64)
    active_from = torch.full((prompts,), steps, dtype=torch.long)
    slots = torch.zeros(prompts, dtype=torch.float64)
    generated_slots = torch.zeros(prompts, dtype=torch.float64)
    kv_bytes = stored = 0
    for batch in batches:
        with momentkv.patched(model, policy(batch) if callable(policy) else policy) as handle:
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
            held = check_stored(stats, handle.policy, label)
            slots[rows], generated_slots[rows] = held.slots, held.generated
            kv_bytes += stats["kv_bytes"]
            stored += stats["stored"]
    return StepMetrics(kl=kl, agree=agree, nll=nll, active_from=active_from, kv_bytes=kv_bytes, stored=stored,
                       slots=slots, generated_slots=generated_slots)
