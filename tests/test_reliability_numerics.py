"""Numerics: float32, float16 and bfloat16 on the CPU; scores in float32; no NaN or inf at the edges."""

import pytest
import torch

import momentkv
from momentkv.core.group_attention import group_attention
from momentkv.core.query_window import QueryWindow
from models import FAMILIES, prompts, tiny_model

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = {"decode": {"budget": 4, "sinks": 1, "recent": 1,
                    "scorers": [{"type": "ema", "alpha": 0.9, "bias_correction": True},
                                {"type": "accumulated", "weight": 0.5, "normalize": "sum"},
                                {"type": "key_norm", "weight": -0.1}]}}


def _check_layers(cache, model_dtype, prompt_len: int, budget: int, steps: int) -> None:
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == model_dtype
        assert layer.scoring.step_total.dtype == torch.float32 and all(s.dtype == torch.float32 for s in layer.scoring.states)
        for tensor in (layer.scoring.step_total, *layer.scoring.states):
            assert torch.isfinite(tensor).all()
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        assert layer.stored == prompt_len + min(budget, steps - 1)  # the last generated token is never fed


def _generate(model, policy, inputs, steps):
    with momentkv.patched(model, policy) as handle:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return torch.stack(out.logits), handle.last_cache


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_finite_and_scores_are_float32(family, dtype):
    model = tiny_model(family, dtype=dtype)
    inputs = prompts(2, 6)  # the second row left-padded
    logits, cache = _generate(model, SMALL, inputs, steps=12)
    assert torch.isfinite(logits).all()  # (generate returns float32 logits for every model dtype)
    _check_layers(cache, dtype, 6, budget=4, steps=12)
    assert cache.stats()["evicted"] > 0


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_group_attention_accumulates_in_float32_without_overflow(dtype):
    """q.k past float16's maximum (65504) with a scaled logit well inside it: finite, equal to float32."""
    torch.manual_seed(0)
    query = torch.full((2, 4, 1, 64), 40.0).to(dtype)
    key = (torch.randn(2, 2, 10, 64).abs() * 40).to(dtype)
    assert (query[0, 0, 0].float() @ key[0, 0].float().T).max() > 65504
    scaling = 64 ** -0.5
    got = group_attention(query, key, None, scaling)
    expected = group_attention(query.float(), key.float(), None, scaling)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    queries = QueryWindow(3)
    queries.push(query.expand(2, 4, 3, 64), 7, scaling)
    window = queries.attention(3, key, torch.arange(10).expand(2, 2, 10), None, None)
    assert window.dtype == torch.float32 and torch.isfinite(window).all() and window.shape == (2, 2, 2, 3, 10)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_padded_row(attn, dtype):
    """A row of the batch that is padding from end to end: generate runs it (transformers warns of right
    padding), the row attends only to its own generated tokens, and momentkv marks its whole prompt invalid.
    Its scores and states stay finite; the logits of both rows are finite."""
    model = tiny_model("qwen2", attn=attn, dtype=dtype)
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    for policy in (SMALL, {"decode": {**SMALL["decode"], "scope": "all", "budget": 6}}):
        logits, cache = _generate(model, policy, {"input_ids": ids, "attention_mask": mask}, steps=10)
        assert torch.isfinite(logits).all()
        for layer in cache.layers:
            assert layer.valid is not None
            assert not layer.valid[1][layer.positions[1] < 5].any()  # the padded row's prompt slots are invalid
            assert layer.valid[0].all()
            for tensor in (layer.scoring.step_total, *layer.scoring.states):
                assert torch.isfinite(tensor).all()
        if policy["decode"].get("scope") == "all":  # invalid slots go first: the padded row keeps no prompt token
            for layer in cache.layers:
                assert (layer.positions[1] >= 5).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_prompts(family):
    model = tiny_model(family, dtype=torch.bfloat16)
    inputs = {"input_ids": torch.tensor([[7], [9]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    logits, cache = _generate(model, SMALL, inputs, steps=9)
    assert torch.isfinite(logits).all()
    _check_layers(cache, torch.bfloat16, 1, budget=4, steps=9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_budget_one(dtype):
    model = tiny_model("mistral", dtype=dtype)
    policy = {"decode": {"budget": 1, "scorers": [{"type": "ema"}]}}
    logits, cache = _generate(model, policy, prompts(3, 5), steps=10)
    assert torch.isfinite(logits).all()
    _check_layers(cache, dtype, 5, budget=1, steps=10)
    for layer in cache.layers:  # the one generated slot always holds the newest token
        assert (layer.positions[..., 5:] == layer.seen - 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_budget_equal_to_protected_tokens(dtype):
    """budget = sinks + recent: every generated slot is protected, eviction takes the oldest non-sink."""
    model = tiny_model("llama", dtype=dtype)
    policy = {"decode": {"budget": 5, "sinks": 2, "recent": 3, "scorers": [{"type": "accumulated"}]}}
    logits, cache = _generate(model, policy, prompts(2, 4), steps=14)
    assert torch.isfinite(logits).all()
    _check_layers(cache, dtype, 4, budget=5, steps=14)
    for layer in cache.layers:
        kept = layer.positions[..., 4:].sort(-1).values
        expected = torch.tensor([4, 5] + list(range(layer.seen - 3, layer.seen)))
        assert torch.equal(kept, expected.expand_as(kept))
