"""Fuzzing patch + generate: random policies x random tiny models of every family x random batches and padding.

Invalid input raises ``PolicyError`` only (and leaves the model untouched); valid input keeps the invariants:
each layer holds at most its budget (+ cadence - 1) beyond what it keeps of the prompt, never more than the
tokens it saw, and no NaN or inf in logits, scores or scorer states.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import momentkv
from momentkv import PolicyError, testing
from models import FAMILIES, tiny_model

_MODELS: dict = {}


@st.composite
def model_specs(draw):
    family = draw(st.sampled_from(FAMILIES))
    kv_heads = draw(st.sampled_from([1, 2]))
    spec = {"family": family, "layers": draw(st.integers(1, 3)), "kv_heads": kv_heads,
            "heads": kv_heads * draw(st.sampled_from([1, 2])),
            "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))}
    window = draw(st.sampled_from([None, 3, 6]))
    if window is not None and family in ("mistral", "phi3", "olmo3", "gemma3_text", "gemma2", "gpt_oss"):
        spec["sliding_window"] = window  # every layer (mistral, phi3), or those layer_types marks sliding
    elif window is not None and family in ("qwen2", "qwen3", "qwen3_moe", "smollm3"):
        spec.update(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    return spec


def _model(spec: dict):
    key = tuple(sorted((k, str(v)) for k, v in spec.items()))
    if key not in _MODELS:
        _MODELS[key] = tiny_model(**spec)
    return _MODELS[key]


@st.composite
def batches(draw):
    """``input_ids`` and ``attention_mask``: left padding of any length per row, the first row never all padding."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(3, 127), min_size=length, max_size=length),
                                     min_size=batch, max_size=batch)))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        pad = draw(st.integers(0, length))
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _check_cache(cache, prompt_len: int) -> None:
    for layer in cache.layers:
        assert layer.stored <= layer.seen
        prompt_stored = layer.stats()["prompt_stored"]
        assert prompt_stored <= prompt_len
        budget = layer.plan.budget_at(layer.generated)
        if budget is not None and not layer.in_context:
            held = layer.stored - layer.first_evictable
            assert held <= budget + layer.plan.cadence - 1
            if layer.plan.scope == "decode":
                assert layer.stored <= prompt_len + budget + layer.plan.cadence - 1
        for tensor in (layer.scoring.step_total, *layer.scoring.states):
            if tensor is not None:
                assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        assert torch.isfinite(layer.keys.float()).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=model_specs(), policy=st.one_of(testing.policies(max_budget=12), testing.policies(prefill=True, max_budget=12)),
       inputs=batches(), steps=st.integers(1, 10), keep_layers=st.booleans())
def test_valid_policies_keep_invariants_on_random_models(spec, policy, inputs, steps, keep_layers):
    model = _model(spec)
    if keep_layers and policy.decode is not None:  # mostly name layers the model has; otherwise expect refusal
        decode = policy.decode.model_copy(
            update={"uncompressed_layers": [i for i in policy.decode.uncompressed_layers if i < spec["layers"]]})
        policy = policy.model_copy(update={"decode": decode})
    try:
        handle = momentkv.patch(model, policy)
    except PolicyError as error:
        assert "does not exist, the model has" in str(error)
        assert momentkv.handle_of(model) is None and "generate" not in model.__dict__
        return
    with handle:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert out.sequences.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + steps)
        assert torch.isfinite(torch.stack(out.logits)).all()
        _check_cache(handle.last_cache, inputs["input_ids"].shape[1])
    assert momentkv.handle_of(model) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=model_specs(), case=testing.invalid_policies())
def test_invalid_policies_raise_policy_error_only(spec, case):
    model = _model(spec)
    implementation = model.config._attn_implementation  # sdpa, or eager for the eager-only families
    try:
        momentkv.patch(model, case.data)
    except PolicyError as error:
        assert any(case.path in p and case.expect in p for p in error.problems), error.problems
    else:
        raise AssertionError(f"accepted invalid policy {case.data}")
    assert momentkv.handle_of(model) is None and "generate" not in model.__dict__
    assert model.config._attn_implementation == implementation
