"""Physical eviction equals a masking oracle: the full cache with the evicted tokens masked out.

The oracle follows the engine's choices where scores tie within rounding (every CPU vector path breaks such
ties its own way) and checks every choice against its own scores (see ``oracle.py``).
"""

import pytest
import torch

from loops import oracle_run, physical_run
from models import FAMILIES, prompts, tiny_model
from momentkv.core import native_build, native_scoring, ranking
from oracle import EngineChoices, untie_key_norms

POLICIES = {
    "ema-corrected-protected": {"decode": {"budget": 5, "recent": 2, "sinks": 1,
                                           "scorers": [{"type": "ema", "alpha": 0.8, "bias_correction": True}]}},
    "instantaneous+recency": {"decode": {"budget": 4, "scorers": [
        {"type": "instantaneous"}, {"type": "recency", "weight": 0.1, "normalize": "rank"}]}},
    "accumulated-layer": {"decode": {"budget": 3, "granularity": "layer", "scorers": [{"type": "accumulated"}]}},
    "key-norm": {"decode": {"budget": 4, "scorers": [{"type": "key_norm"}]}},
    "peak+keydiff-sum": {"decode": {"budget": 4, "cadence": 2, "scorers": [
        {"type": "peak", "decay": 0.7, "normalize": "sum"}, {"type": "keydiff", "weight": 0.5, "normalize": "max"}]}},
}


def _model(family, attn, **extra):
    return untie_key_norms(tiny_model(family, attn, **extra))


def _compare(family, policy, steps=14, model=_model):
    extra = {"sliding_window": 6} if family == "mistral" else {}
    inputs = prompts(batch=3, length=7)
    choices = EngineChoices()
    physical, _ = physical_run(model(family, "sdpa", **extra), policy, inputs, steps=steps, on_step=choices)
    oracle = oracle_run(model(family, "eager", **extra), policy, inputs, steps=steps, follow=choices)
    return physical, oracle, choices


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_physical_eviction_matches_masking_oracle(family, policy_name):
    policy = POLICIES[policy_name]
    physical, oracle, choices = _compare(family, policy)
    extra = {"sliding_window": 6} if family == "mistral" else {}
    full, _ = physical_run(_model(family, "sdpa", **extra), "full.yaml", prompts(batch=3, length=7), steps=14)
    assert torch.isfinite(physical).all()
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    # Eviction really happened and changed the result, so the agreement above means something; and the
    # data decides: nearly every eviction had one right answer beyond rounding, which the engine gave.
    assert (physical - full).abs().max() > 1e-3
    assert choices.checked >= 40 and choices.forced >= 0.9 * choices.checked, (choices.checked, choices.forced)


def test_near_ties_follow_the_engine_key_norm_on_untrained_qwen3():
    """Qwen3's k_norm with its initial gains (all 1) gives every key the same norm up to rounding: each
    eviction is a near-tie that each CPU breaks its own way. The oracle accepts the engine's choice, then
    agrees on the logits; hardly any eviction is decided by the data (the norms differ by ``rms_norm_eps``
    over the keys' mean square, a few float32 units)."""
    physical, oracle, choices = _compare("qwen3", POLICIES["key-norm"], model=tiny_model)
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    assert choices.checked >= 40 and choices.forced <= choices.checked // 4, (choices.checked, choices.forced)


@pytest.mark.parametrize("fault", ["highest", "second lowest"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_oracle_catches_an_engine_evicting_the_wrong_token(monkeypatch, family, fault):
    """The engine made to evict its highest-ranked unprotected token, or its second lowest: the oracle's own
    scores put a kept token clearly below, and it says so."""
    def wrong(ranked):
        if fault == "highest":
            return ranked.masked_fill(ranked == float("inf"), float("-inf")).argmax(dim=-1, keepdim=True)
        two = ranked.topk(2, dim=-1, largest=False)
        return torch.where(two.values[..., 1:] == float("inf"), two.indices[..., :1], two.indices[..., 1:])

    monkeypatch.setattr(ranking, "lowest", wrong)
    monkeypatch.setattr(native_build, "_SETTING", "0")  # the fault is planted in the tensor step's choice
    with pytest.raises(AssertionError, match="evicted with score"):
        _compare(family, POLICIES["ema-corrected-protected"])


def test_granularity_layer_evicts_the_same_token_in_every_head():
    policy = POLICIES["accumulated-layer"]
    seen_positions = []
    physical_run(tiny_model("llama"), policy, prompts(batch=2, length=5), steps=8,
                 on_step=lambda step, cache: seen_positions.append(cache.layers[0].positions.clone()))
    final = seen_positions[-1]
    assert torch.equal(final[:, :1].expand_as(final).sort(-1).values, final.sort(-1).values)
