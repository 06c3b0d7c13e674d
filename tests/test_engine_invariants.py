"""Invariants of the evicting cache under random policies, prompts and batch shapes (Hypothesis)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import momentkv
from loops import physical_run, positions_for
from models import FAMILIES, prompts, tiny_model

_MODELS = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


@st.composite
def policies(draw):
    budget = draw(st.integers(1, 8))
    sinks = draw(st.integers(0, budget - 1))
    recent = draw(st.integers(0, budget - sinks))
    scorer = draw(st.sampled_from([
        {"type": "ema", "alpha": draw(st.floats(0.05, 1.0)), "bias_correction": draw(st.booleans())},
        {"type": "instantaneous"}, {"type": "accumulated"}, {"type": "recency"}, {"type": "key_norm"},
    ]))
    return {"decode": {"budget": budget, "sinks": sinks, "recent": recent, "scorers": [scorer],
                       "granularity": draw(st.sampled_from(["head", "layer"]))}}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(FAMILIES),
    policy=policies(),
    batch=st.integers(1, 3),
    prompt_len=st.integers(1, 8),
    steps=st.integers(1, 16),
    seed=st.integers(0, 1000),
)
def test_budget_protection_prompt_and_determinism(family, policy, batch, prompt_len, steps, seed):
    model = _model(family)
    inputs = prompts(batch=batch, length=prompt_len, seed=seed)
    decode = policy["decode"]
    with torch.no_grad():
        reference = DynamicCache()
        mask = inputs["attention_mask"]
        model(**inputs, position_ids=positions_for(mask), cache=reference, use_cache=True)
    prompt_keys = [layer.keys.clone() for layer in reference.layers]

    def check(step, cache):
        for layer, ref_keys in zip(cache.layers, prompt_keys):
            assert layer.stored <= prompt_len + decode["budget"]
            assert torch.equal(layer.keys[:, :, :prompt_len], ref_keys)  # the prompt, bit for bit
            generated = min(step, steps)
            # Sinks: the first generated tokens stay in every head.
            for pos in range(prompt_len, prompt_len + min(decode["sinks"], generated)):
                assert (layer.positions == pos).any(-1).all()
            # Recent: the newest `recent` fed tokens stay in every head.
            newest = range(max(prompt_len, layer.seen - max(decode["recent"], 1)), layer.seen)
            for pos in newest:
                assert (layer.positions == pos).any(-1).all()
            # No slot holds the same token twice.
            sorted_pos = layer.positions.sort(-1).values
            assert (sorted_pos[..., 1:] > sorted_pos[..., :-1]).all()

    first, _ = physical_run(model, policy, inputs, steps, seed=seed, on_step=check)
    second, _ = physical_run(model, policy, inputs, steps, seed=seed)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


@settings(max_examples=15, deadline=None)
@given(budget=st.integers(1, 6), steps=st.integers(0, 6), batch=st.integers(1, 3), family=st.sampled_from(FAMILIES))
def test_same_logits_as_full_cache_while_budget_not_reached(budget, steps, batch, family):
    steps = min(steps, budget - 1)
    model = _model(family)
    inputs = prompts(batch=batch, length=5)
    policy = {"decode": {"budget": budget, "scorers": [{"type": "ema", "alpha": 0.5}]}}
    got, cache = physical_run(model, policy, inputs, steps)
    full, _ = physical_run(model, "full.yaml", inputs, steps)
    # Decode steps compute attention and scores in one pass (probs @ V in float32), not through SDPA.
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert cache.stats()["evicted"] == 0
    # Told that the budget will not be reached (as generate() tells it), the cache skips scoring: exact.
    told, _ = physical_run(model, policy, inputs, steps, tell_length=True)
    assert torch.equal(told, full)


def test_beam_search_with_eviction_keeps_state_aligned():
    model = tiny_model("qwen2")
    with momentkv.patched(model, {"decode": {"budget": 3, "recent": 1, "scorers": [{"type": "ema"}]}}) as handle:
        out = model.generate(**prompts(batch=2, length=5), max_new_tokens=10, num_beams=3, do_sample=False)
        cache = handle.last_cache
    assert out.shape == (2, 15)
    for layer in cache.layers:
        assert layer.keys.shape[0] == 6 and layer.stored == 5 + 3
        assert layer.scoring.step_total.shape == layer.positions[..., 5:].shape
        assert all(state.shape == layer.scoring.step_total.shape for state in layer.scoring.states)


def test_reorder_cache_moves_every_per_slot_tensor():
    model = tiny_model("llama")
    policy = {"decode": {"budget": 2, "scorers": [{"type": "ema"}]}}
    _, cache = physical_run(model, policy, prompts(batch=3, length=4), steps=6)
    layer = cache.layers[1]
    before = {name: getattr(layer, name).clone() for name in ("keys", "values", "positions", "scores")}
    states = [s.clone() for s in layer.scoring.states]
    order = torch.tensor([2, 0, 2])
    cache.reorder_cache(order)
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor[order])
    assert all(torch.equal(s, old[order]) for s, old in zip(layer.scoring.states, states))


def test_memory_really_shrinks():
    model = tiny_model("llama")
    _, small = physical_run(model, {"decode": {"budget": 4, "scorers": [{"type": "recency"}]}}, prompts(1, 6), steps=40)
    _, full = physical_run(model, "full.yaml", prompts(1, 6), steps=40)
    assert small.stats()["kv_bytes"] * 4 < full.stats()["kv_bytes"]
    assert all(layer.keys.shape[2] == 10 for layer in small.layers)
