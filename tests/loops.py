"""Manual decode loops shared by the engine tests: the same token stream through different caches."""

from __future__ import annotations

import torch

import momentkv


def positions_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them: cumulative count of real tokens, 0 at padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def token_stream(batch: int, steps: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    """Random tokens ``(steps, batch)`` to feed teacher-forced, identical for every run.

    No token repeats within a row: a repeated token's first-layer key is the first one's rotated by RoPE, so a
    scorer of key norms would see two equal scores, which two implementations (the engine, the oracle) break by
    rounding, and each choice would be right.
    """
    if steps > vocab - 3:
        raise ValueError(f"{steps} distinct tokens per row need a vocabulary of at least {steps + 3}")
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab - 3, generator=g)[:steps] + 3 for _ in range(batch)], dim=1)


@torch.no_grad()
def physical_run(model, policy, inputs, steps: int, seed: int = 0, on_step=None, tell_length: bool = False):
    """Feed the prompt then ``steps`` tokens through a patched model; return logits ``(steps + 1, batch, vocab)``.

    ``on_step(step, cache)`` is called after each forward. ``tell_length``: tell the cache the prompt length
    and the number of steps, as ``generate`` does.
    """
    handle = momentkv.patch(model, policy)
    try:
        cache = handle.new_cache()
        if tell_length:
            cache.expect(inputs["input_ids"].shape[1], steps)
        mask = inputs["attention_mask"]
        out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions_for(mask),
                    cache=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        if on_step:
            on_step(0, cache)
        next_pos = positions_for(mask)[:, -1:] + 1
        for i, tok in enumerate(token_stream(mask.shape[0], steps, seed).to(mask.device)):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True)
            next_pos = next_pos + 1
            logits.append(out.logits[:, -1])
            if on_step:
                on_step(i + 1, cache)
        return torch.stack(logits), cache
    finally:
        handle.remove()


@torch.no_grad()
def oracle_run(model, policy, inputs, steps: int, seed: int = 0, follow=None):
    """The same stream through :class:`tests.oracle.MaskingOracle` (full cache, evicted tokens masked).

    ``follow``: the engine's choices (:class:`tests.oracle.EngineChoices`, recorded by ``physical_run``), which
    the oracle checks at each eviction and then makes too (see ``oracle.py`` on near-ties)."""
    from oracle import MaskingOracle

    mask = inputs["attention_mask"]
    oracle = MaskingOracle(model, policy, mask, follow=follow)
    logits = [oracle.prefill(inputs["input_ids"], mask, positions_for(mask))]
    next_pos = positions_for(mask)[:, -1:] + 1
    for tok in token_stream(mask.shape[0], steps, seed):
        logits.append(oracle.step(tok[:, None], next_pos))
        next_pos = next_pos + 1
    return torch.stack(logits)
