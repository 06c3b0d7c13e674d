"""The reference pass: the full cache generates ``steps`` tokens per prompt, end-of-sequence suppressed.

Greedily by default, or sampled (``Sampling``: temperature, top-p, one seeded stream per prompt, see
:mod:`momentkv.eval.sampling`); teacher-forced replay then follows whichever tokens were chosen.

Run through the patched model with ``full.yaml`` (no eviction), so that the reference and every policy's
replay go through the same attention function; the engine guarantees this is bit-identical to the
unpatched model. Each step's log-probabilities are kept: they are what every policy is compared against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import momentkv
from momentkv.eval.batches import Batch
from momentkv.eval.sampling import Sampling, TokenChooser
from momentkv.eval.stepping import run_steps


@dataclass
class Reference:
    tokens: torch.Tensor  # (prompts, steps) long, the full cache's output (greedy or sampled)
    logprobs: torch.Tensor  # (prompts, steps, vocab) float32, the full cache's next-token log-probabilities
    suppressed: list[int]  # token ids never chosen (end of sequence)
    sampling: Sampling | None = None  # None: greedy
    prompt_ids: list[str] | None = None  # the prompts' ids, which seed a sampled reference's streams

    def chooser(self) -> TokenChooser:
        """How tokens were chosen for this reference (free-running decoding chooses the same way)."""
        return TokenChooser(self.suppressed, self.sampling, self.prompt_ids, self.steps)

    @property
    def steps(self) -> int:
        return self.tokens.shape[1]


def generate_reference(model, batches: list[Batch], steps: int, suppressed: list[int], progress=None,
                       store_device=None, sampling: Sampling | None = None, prompt_ids: list[str] | None = None,
                       logprobs_out: torch.Tensor | None = None) -> Reference:
    """Full-cache generation of ``steps`` tokens for every prompt of ``batches``, greedy unless ``sampling``.

    ``prompt_ids`` (one per prompt, in prompt-list order) seed a sampled reference. ``logprobs_out``, if
    given, is the ``(prompts, steps, vocab)`` float32 tensor to fill (e.g. backed by a memory-mapped file).
    """
    prompts = sum(len(b.rows) for b in batches)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    device = store_device if store_device is not None else batches[0].input_ids.device
    tokens = torch.zeros((prompts, steps), dtype=torch.long, device=device)
    if logprobs_out is not None:
        if tuple(logprobs_out.shape) != (prompts, steps, vocab):
            raise ValueError(f"logprobs_out is {tuple(logprobs_out.shape)}, expected {(prompts, steps, vocab)}")
        logprobs = logprobs_out
    else:
        logprobs = torch.zeros((prompts, steps, vocab), dtype=torch.float32, device=device)
    chooser = TokenChooser(suppressed, sampling, prompt_ids, steps)
    with momentkv.patched(model, "full.yaml") as handle:
        for batch in batches:
            rows = torch.tensor(batch.rows, device=device)
            chosen = {}

            def pick(step, logits):
                return chosen[step]

            for step, logits, _ in run_steps(model, handle.new_cache(), batch.input_ids, batch.attention_mask,
                                             steps, pick):
                chosen[step] = chooser.choose(step, logits, batch.rows)  # (b,)
                tokens[rows, step] = chosen[step].to(device)
                logprobs[rows.to(logprobs.device), step] = torch.log_softmax(logits, dim=-1)[:, :vocab].to(logprobs.device)
                if progress is not None:
                    progress.update(len(batch.rows))
    return Reference(tokens=tokens, logprobs=logprobs, suppressed=list(suppressed), sampling=sampling,
                     prompt_ids=None if prompt_ids is None else list(prompt_ids))
