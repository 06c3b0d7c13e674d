"""One forward per token: the decoding loop every evaluation pass shares.

``run_steps`` feeds a left-padded batch of prompts, then one token per row per step, through a model whose
cache is an :class:`~momentkv.EvictingCache` (or any cache), and yields each step's next-token logits.
Which token is fed next is the caller's choice (the reference token when teacher forcing, the argmax when
running free), so teacher-forced replay, free-running greedy decoding and the reference pass are one loop.
Positions come from the attention mask, as in ``generate``: padded rows start at position 0.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

NEG_INF = float("-inf")


def left_pad(sequences: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(batch, longest)`` with every row padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq):] = 1
    return ids.to(device), mask.to(device)


def suppress(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``logits`` ``(batch, vocab)`` with ``token_ids`` set to -inf (a copy), e.g. end-of-sequence tokens."""
    if not token_ids:
        return logits
    out = logits.clone()
    out[:, token_ids] = NEG_INF
    return out


def cache_has_evicted(cache) -> bool:
    """Whether any layer of ``cache`` has evicted a token (False for caches that never evict)."""
    return any(getattr(layer, "evicted", 0) for layer in getattr(cache, "layers", ()))


@torch.inference_mode()
def run_steps(
    model,
    cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    next_tokens: Callable[[int, torch.Tensor], torch.Tensor],
) -> Iterator[tuple[int, torch.Tensor, bool]]:
    """Yield ``(step, logits, evicted)`` for ``steps`` steps.

    ``logits`` ``(batch, vocab)`` float32 predict generated token ``step`` (step 0 comes from the prompt);
    ``evicted`` says whether the cache had dropped a generated token by then. After each yield,
    ``next_tokens(step, logits)`` ``-> (batch,)`` gives the tokens to feed.
    """
    mask = attention_mask
    if hasattr(cache, "expect"):  # an evicting cache: it skips scoring if these steps cannot reach its budget
        cache.expect(input_ids.shape[1], max(steps - 1, 0))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (b, prompt)
    # Only the last position's logits are needed: the prompt's would cost (b, prompt, vocab) floats.
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    logits = out.logits[:, -1].float()
    last = positions[:, -1:]  # (b, 1)
    for step in range(steps):
        yield step, logits, cache_has_evicted(cache)
        if step == steps - 1:
            break
        fed = next_tokens(step, logits).view(-1, 1)  # (b, 1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last = last + 1
        out = model(input_ids=fed, attention_mask=mask, position_ids=last, cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
