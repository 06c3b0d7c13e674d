"""How the next token is chosen when a reference is generated: greedily, or sampled with a per-prompt seed.

A sampled reference avoids the loops of long greedy outputs of small models, which flatter every policy (a
looping text is easy to continue from any few tokens). Reproducibility does not depend on the batch: each
prompt owns a stream of uniform numbers drawn from its own generator, seeded by the run's seed and the
prompt's id, one number per step. A step's token is the inverse CDF of the tempered, top-p (nucleus,
Holtzman et al., arXiv 1904.09751) truncated distribution at that step's number, so a prompt gets the same
tokens alone, in any batch, in any order, or in a subset of the prompt file, as long as its logits are the
same.

The same numbers drive free-running decoding under a policy (common random numbers): where the policy's
distribution equals the full cache's, it draws the same token, so its first divergent step measures the
policy and not the luck of the draw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from momentkv.errors import PolicyError
from momentkv.eval.stepping import suppress


@dataclass(frozen=True)
class Sampling:
    """Temperature, nucleus mass and seed of a sampled reference."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise PolicyError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PolicyError(f"--top-p must be in (0, 1], got {self.top_p}")

    def describe(self) -> str:
        return f"sampled (temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed})"


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed from the run's ``seed`` and a prompt's id (stable across processes and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_uniforms(prompt_ids: list[str], steps: int, seed: int) -> torch.Tensor:
    """``(P, steps)`` float64 uniforms in [0, 1): row ``p`` depends only on ``seed`` and ``prompt_ids[p]``."""
    rows = []
    for prompt_id in prompt_ids:
        g = torch.Generator().manual_seed(prompt_seed(seed, prompt_id))
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros((0, steps), dtype=torch.float64)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Inverse-CDF draws: ``logits`` ``(b, V)`` (suppressed tokens at -inf), ``uniforms`` ``(b,)`` -> ``(b,)``.

    Tokens are ordered by probability (ties by id, a stable sort), the smallest prefix whose mass reaches
    ``top_p`` is kept, and the token whose cumulative share of that prefix first exceeds the uniform is drawn.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (b, V), float64 so the CDF is exact enough
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(-1)
    # Keep a token while the mass before it is below top_p: the first token is always kept.
    keep = (cdf - sorted_probs) < top_p
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    kept_cdf = kept.cumsum(-1)
    target = uniforms.to(kept_cdf).view(-1, 1) * kept_cdf[:, -1:]  # (b, 1)
    index = torch.searchsorted(kept_cdf, target, right=True).clamp_max(keep.sum(-1, keepdim=True) - 1)  # (b, 1)
    return order.gather(-1, index).squeeze(-1)


class TokenChooser:
    """The next token of each row: greedy (argmax) or sampled from each prompt's own stream.

    ``choose(step, logits, rows)`` takes ``logits`` ``(b, V)`` for the prompts ``rows`` (indices into the
    prompt list) and returns ``(b,)`` token ids; end-of-sequence tokens (``suppressed``) are never chosen.
    """

    def __init__(self, suppressed: list[int], sampling: Sampling | None = None,
                 prompt_ids: list[str] | None = None, steps: int = 0):
        self.suppressed = list(suppressed)
        self.sampling = sampling
        self.uniforms = None
        if sampling is not None:
            if prompt_ids is None:
                raise ValueError("a sampled reference needs the prompts' ids")
            self.uniforms = prompt_uniforms(prompt_ids, steps, sampling.seed)  # (P, steps)

    def describe(self) -> str:
        return "greedy" if self.sampling is None else self.sampling.describe()

    def choose(self, step: int, logits: torch.Tensor, rows) -> torch.Tensor:
        masked = suppress(logits, self.suppressed)
        if self.sampling is None:
            return masked.argmax(-1)
        u = self.uniforms[torch.as_tensor(rows), step]
        return sample_tokens(masked, u, self.sampling.temperature, self.sampling.top_p).to(logits.device)
