"""The evaluation, end to end: one reference pass shared by every policy, then each policy's passes.

For every config: teacher-forced replay of the reference (KL, top-1 agreement, NLL per step) and, unless
switched off, free-running greedy decoding (first divergent step, share of equal tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from momentkv.eval.batches import make_batches
from momentkv.eval.configs import EvalConfig
from momentkv.eval.freerun import FreeRun, free_running
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.reference import Reference, generate_reference
from momentkv.eval.replay import StepMetrics, teacher_forced


@dataclass
class ConfigResult:
    config: EvalConfig
    metrics: StepMetrics
    free: FreeRun | None
    seconds: float  # wall time of this config's passes


@dataclass
class EvalResults:
    records: list[PromptRecord]
    steps: int
    seed: int
    model_name: str
    results: list[ConfigResult] = field(default_factory=list)
    reference_tokens: torch.Tensor | None = None
    reference_nll: torch.Tensor | None = None  # (P, N) the full cache's own NLL of its greedy output
    meta: dict = field(default_factory=dict)


def run_eval(model, encoded: list[list[int]], records: list[PromptRecord], configs: list[EvalConfig], steps: int,
             suppressed: list[int], pad_id: int, batch_size: int = 8, seed: int = 0, free_run: bool = True,
             progress: bool = True, model_name: str = "model") -> EvalResults:
    """Evaluate ``configs`` on the prompts ``encoded`` (token ids, aligned with ``records``)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    batches = make_batches(encoded, batch_size, pad_id, device)
    per_pass = len(encoded) * steps
    total = per_pass * (1 + len(configs) * (2 if free_run else 1))
    bar = tqdm(total=total, unit="tok", desc="reference", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    reference = generate_reference(model, batches, steps, suppressed, progress=bar)
    out = EvalResults(records=records, steps=steps, seed=seed, model_name=model_name,
                      reference_tokens=reference.tokens.cpu(), reference_nll=reference_nll(reference),
                      meta={"batch_size": batch_size, "reference_seconds": time.perf_counter() - started,
                            "device": str(device)})
    for config in configs:
        out.results.append(evaluate_config(model, config, batches, reference, free_run, bar))
    bar.close()
    return out


def evaluate_config(model, config: EvalConfig, batches, reference: Reference, free_run: bool, bar=None) -> ConfigResult:
    """Both passes of one config against ``reference``."""
    if bar is not None:
        bar.set_description(config.label)
    started = time.perf_counter()
    metrics = teacher_forced(model, config.policy, batches, reference, progress=bar)
    free = free_running(model, config.policy, batches, reference, progress=bar) if free_run else None
    return ConfigResult(config=config, metrics=metrics, free=free, seconds=time.perf_counter() - started)


def reference_nll(reference: Reference) -> torch.Tensor:
    """``(P, N)`` the full cache's NLL of its own greedy tokens (the floor every policy's NLL is read against)."""
    lp = reference.logprobs.gather(-1, reference.tokens.unsqueeze(-1)).squeeze(-1)
    return (-lp).double().cpu()
