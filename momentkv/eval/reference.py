"""The reference pass: the full cache generates ``steps`` tokens greedily per prompt, end-of-sequence suppressed.

Run through the patched model with ``full.yaml`` (no eviction), so that the reference and every policy's
replay go through the same attention function; the engine guarantees this is bit-identical to the
unpatched model. Each step's log-probabilities are kept: they are what every policy is compared against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import momentkv
from momentkv.eval.batches import Batch
from momentkv.eval.stepping import run_steps, suppress


@dataclass
class Reference:
    tokens: torch.Tensor  # (prompts, steps) long, the full cache's greedy output
    logprobs: torch.Tensor  # (prompts, steps, vocab) float32, the full cache's next-token log-probabilities
    suppressed: list[int]  # token ids never chosen (end of sequence)

    @property
    def steps(self) -> int:
        return self.tokens.shape[1]


def generate_reference(model, batches: list[Batch], steps: int, suppressed: list[int], progress=None,
                       store_device=None) -> Reference:
    """Greedy full-cache generation of ``steps`` tokens for every prompt of ``batches``."""
    prompts = sum(len(b.rows) for b in batches)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    device = store_device if store_device is not None else batches[0].input_ids.device
    tokens = torch.zeros((prompts, steps), dtype=torch.long, device=device)
    logprobs = torch.zeros((prompts, steps, vocab), dtype=torch.float32, device=device)
    with momentkv.patched(model, "full.yaml") as handle:
        for batch in batches:
            rows = torch.tensor(batch.rows, device=device)
            chosen = {}

            def pick(step, logits):
                return chosen[step]

            for step, logits, _ in run_steps(model, handle.new_cache(), batch.input_ids, batch.attention_mask,
                                             steps, pick):
                chosen[step] = suppress(logits, suppressed).argmax(-1)  # (b,)
                tokens[rows, step] = chosen[step].to(device)
                logprobs[rows, step] = torch.log_softmax(logits, dim=-1)[:, :vocab].to(device)
                if progress is not None:
                    progress.update(len(batch.rows))
    return Reference(tokens=tokens, logprobs=logprobs, suppressed=list(suppressed))
