"""The built-in scorers' engine flags hold: ``batched_now`` and ``reads_cache`` (``momentkv.scoring.base``).

An engine batching sequences of different lengths (the vLLM backend) gives ``now`` as a ``(batch, 1, 1)``
tensor to the scorers that declare ``batched_now``, and leaves ``keys``/``values`` out for those that do not
declare ``reads_cache``. Checked here for every built-in scorer (and the options that change its arithmetic)
over several steps: rows of different lengths scored together, ``now`` a tensor, give the states and scores
of each row scored alone with an int ``now`` and its keys present.
"""

from __future__ import annotations

import pytest
import torch

from momentkv.scoring.base import ScoreContext
from momentkv.scoring.registry import scorer_class, scorer_names

BUILT_IN = [name for name in scorer_names() if scorer_class(name).__module__.startswith("momentkv.scoring.")]
VARIANTS = [{"type": name} for name in BUILT_IN] + [
    {"type": "last_hit", "recurrence": True},
    {"type": "last_hit", "relative": False, "threshold": 0.1},
    {"type": "ema", "alpha": 0.8, "bias_correction": True},
    {"type": "peak", "kernel": 3},
]
BATCH, HEADS, TOKENS, DIM, STEPS = 3, 2, 9, 8, 6
PROMPTS = [5, 40, 17]  # rows of different lengths


def _zeros(scorer, batch: int) -> torch.Tensor:
    c = scorer.state_channels
    return torch.zeros((batch, HEADS, TOKENS) if c == 1 else (c, batch, HEADS, TOKENS))


def _row(state: torch.Tensor, r: int) -> torch.Tensor:
    return state[r : r + 1] if state.dim() == 3 else state[:, r : r + 1]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_rows_of_different_lengths_score_together_as_alone(config):
    scorer = scorer_class(config["type"]).model_validate(config)
    assert scorer.batched_now, f"{config['type']} is built in: it should take a per-row now"
    generator = torch.Generator().manual_seed(0)
    together = _zeros(scorer, BATCH)
    alone = [_zeros(scorer, 1) for _ in range(BATCH)]
    prompt = torch.tensor(PROMPTS).view(-1, 1, 1)
    for step in range(STEPS):
        positions = (prompt + torch.arange(TOKENS) + step).expand(BATCH, HEADS, TOKENS)  # sliding generated slots
        now = prompt + TOKENS - 1 + step  # (B, 1, 1): each row's newest token
        attention = torch.softmax(torch.randn(BATCH, HEADS, TOKENS, generator=generator) * 3, dim=-1)
        keys = torch.randn(BATCH, HEADS, TOKENS, DIM, generator=generator)
        values = torch.randn(BATCH, HEADS, TOKENS, DIM, generator=generator)
        cache = (keys, values) if scorer.reads_cache else (None, None)
        ctx = ScoreContext(attention if scorer.needs_attention else None, cache[0], together, positions=positions,
                           now=now, values=cache[1])
        scores = scorer.update(ctx)
        for r in range(BATCH):
            one = ScoreContext(attention[r : r + 1] if scorer.needs_attention else None, keys[r : r + 1], alone[r],
                               positions=positions[r : r + 1], now=int(now[r]), values=values[r : r + 1])
            expected = scorer.update(one)
            torch.testing.assert_close(scores[r : r + 1], expected, rtol=1e-6, atol=0.0)
            torch.testing.assert_close(_row(together, r), alone[r], rtol=1e-6, atol=0.0)


def test_a_user_scorer_is_not_batched_and_reads_the_cache_by_default():
    from momentkv.scoring.base import Scorer

    assert Scorer.batched_now is False and Scorer.reads_cache is True
