"""Physical eviction equals a masking oracle: the full cache with the evicted tokens masked out."""

import pytest
import torch

from loops import oracle_run, physical_run
from models import FAMILIES, prompts, tiny_model

POLICIES = {
    "ema-corrected-protected": {"decode": {"budget": 5, "recent": 2, "sinks": 1,
                                           "scorers": [{"type": "ema", "alpha": 0.8, "bias_correction": True}]}},
    "instantaneous+recency": {"decode": {"budget": 4, "scorers": [
        {"type": "instantaneous"}, {"type": "recency", "weight": 0.1, "normalize": "rank"}]}},
    "accumulated-layer": {"decode": {"budget": 3, "granularity": "layer", "scorers": [{"type": "accumulated"}]}},
    "key-norm": {"decode": {"budget": 4, "scorers": [{"type": "key_norm"}]}},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_physical_eviction_matches_masking_oracle(family, policy_name):
    extra = {"sliding_window": 6} if family == "mistral" else {}
    policy = POLICIES[policy_name]
    inputs = prompts(batch=3, length=7)
    physical, _ = physical_run(tiny_model(family, "sdpa", **extra), policy, inputs, steps=14)
    oracle = oracle_run(tiny_model(family, "eager", **extra), policy, inputs, steps=14)
    full, _ = physical_run(tiny_model(family, "sdpa", **extra), "full.yaml", inputs, steps=14)
    assert torch.isfinite(physical).all()
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    # Eviction really happened and changed the result, so the agreement above means something.
    assert (physical - full).abs().max() > 1e-3


def test_granularity_layer_evicts_the_same_token_in_every_head():
    policy = POLICIES["accumulated-layer"]
    seen_positions = []
    physical_run(tiny_model("llama"), policy, prompts(batch=2, length=5), steps=8,
                 on_step=lambda step, cache: seen_positions.append(cache.layers[0].positions.clone()))
    final = seen_positions[-1]
    assert torch.equal(final[:, :1].expand_as(final).sort(-1).values, final.sort(-1).values)
