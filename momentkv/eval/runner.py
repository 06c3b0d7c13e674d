"""The evaluation, end to end: one reference pass shared by every policy, then each policy's passes.

For every config: teacher-forced replay of the reference (KL, top-1 agreement, NLL per step) and, unless
switched off, free-running decoding (first divergent step, share of equal tokens). The reference is greedy,
or sampled (``sampling``); with a :class:`~momentkv.eval.store.SavedEvaluation` the reference and every
finished pass are saved, and those already saved are loaded instead of recomputed.
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
from momentkv.eval.full_cache_reference import Reference, generate_reference
from momentkv.eval.repetition import REPETITION_N, repetition_per_prompt
from momentkv.eval.replay import StepMetrics, teacher_forced
from momentkv.eval.sampling import Sampling


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
    reference_nll: torch.Tensor | None = None  # (P, N) the full cache's own NLL of its output
    meta: dict = field(default_factory=dict)
    reference_repetition: torch.Tensor | None = None  # (P,) rep-n of each reference (n = meta["repetition_n"])
    prompt_lengths: list[int] | None = None  # tokens of each encoded prompt


def run_eval(model, encoded: list[list[int]], records: list[PromptRecord], configs: list[EvalConfig], steps: int,
             suppressed: list[int], pad_id: int, batch_size: int = 8, seed: int = 0, free_run: bool = True,
             progress: bool = True, model_name: str = "model", sampling: Sampling | None = None,
             store=None, log=None) -> EvalResults:
    """Evaluate ``configs`` on the prompts ``encoded`` (token ids, aligned with ``records``).

    ``sampling`` samples the reference (greedy when None). ``store`` (a ``SavedEvaluation``) saves the
    reference and each pass, and loads what it already holds. ``log`` receives one line per config (the
    stored slots it was checked against). Configs with one policy per prompt need ``batch_size == 1``.
    """
    if batch_size != 1 and any(c.prompt_policies is not None for c in configs):
        raise ValueError("configs with a policy per prompt (total budgets) decode each prompt alone: batch_size 1")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    batches = make_batches(encoded, batch_size, pad_id, device)
    per_pass = len(encoded) * steps
    total = per_pass * (1 + len(configs) * (2 if free_run else 1))
    bar = tqdm(total=total, unit="tok", desc="reference", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    reference = store.load_reference() if store is not None else None
    if reference is not None:
        bar.update(per_pass)
        reference_seconds = 0.0
    else:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        buffer = store.logprobs_buffer((len(encoded), steps, vocab)) if store is not None else None
        reference = generate_reference(model, batches, steps, suppressed, progress=bar, sampling=sampling,
                                       prompt_ids=[r.id for r in records], logprobs_out=buffer,
                                       store_device="cpu" if store is not None else None)
        reference_seconds = time.perf_counter() - started
        if store is not None:
            store.save_reference(reference, records, reference_seconds, str(device))
    out = EvalResults(records=records, steps=steps, seed=seed, model_name=model_name,
                      reference_tokens=reference.tokens.cpu(), reference_nll=reference_nll(reference),
                      meta={"batch_size": batch_size, "reference_seconds": reference_seconds, "device": str(device),
                            "reference": "greedy" if sampling is None else sampling.describe(),
                            "repetition_n": REPETITION_N},
                      reference_repetition=repetition_per_prompt(reference.tokens.cpu()),
                      prompt_lengths=[len(e) for e in encoded])
    for config in configs:
        saved = store.load_pass(config, free_run, reference.tokens) if store is not None else None
        if saved is not None:
            bar.update(per_pass * (2 if free_run else 1))
            result = saved
        else:
            result = evaluate_config(model, config, batches, reference, free_run, bar)
            if store is not None:
                store.save_pass(result, free_run, str(device))
        out.results.append(result)
        if log is not None:
            log(stored_line(result, saved is not None))
    bar.close()
    return out


def stored_line(result: ConfigResult, loaded: bool = False) -> str:
    """One line saying what a config's cache held after its last step (checked against its budget)."""
    m = result.metrics
    where = "loaded from the store" if loaded else f"{result.seconds:.0f} s"
    if m.slots is None:
        return f"{result.config.label}: {where}"
    return (f"{result.config.label}: KV slots per layer after the last step: mean {float(m.slots.mean()):.1f} "
            f"(max {float(m.slots.max()):.0f}), of which generated {float(m.generated_slots.mean()):.1f}; "
            f"within budget ({where})")


def evaluate_config(model, config: EvalConfig, batches, reference: Reference, free_run: bool, bar=None) -> ConfigResult:
    """Both passes of one config against ``reference``."""
    if bar is not None:
        bar.set_description(config.label)
    started = time.perf_counter()
    metrics = teacher_forced(model, config.runnable, batches, reference, progress=bar, label=config.label)
    free = free_running(model, config.runnable, batches, reference, progress=bar) if free_run else None
    return ConfigResult(config=config, metrics=metrics, free=free, seconds=time.perf_counter() - started)


def reference_nll(reference: Reference) -> torch.Tensor:
    """``(P, N)`` the full cache's NLL of its own tokens (the floor every policy's NLL is read against)."""
    lp = reference.logprobs.gather(-1, reference.tokens.unsqueeze(-1)).squeeze(-1)
    return (-lp).double().cpu()
