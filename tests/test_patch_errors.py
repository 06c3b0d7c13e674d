"""Bad input raises PolicyError naming the problem, before anything on the model changes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import momentkv
from momentkv import PolicyError
from momentkv.patches import SUPPORTED_MODEL_TYPES
from models import prompts, tiny_model


def _fingerprint(model):
    return (model.config._attn_implementation, "generate" in model.__dict__, momentkv.handle_of(model))


def test_unsupported_model_type_names_supported_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    before = _fingerprint(model)
    with pytest.raises(PolicyError, match=r"unsupported model type 'gpt2'.*" + ", ".join(SUPPORTED_MODEL_TYPES)):
        momentkv.patch(model, "moment.yaml")
    assert _fingerprint(model) == before


def test_unsupported_attention_implementation():
    model = tiny_model("llama")
    model.set_attn_implementation("flex_attention")
    before = _fingerprint(model)
    with pytest.raises(PolicyError, match=r"unsupported attention implementation 'flex_attention'.*sdpa, eager"):
        momentkv.patch(model, "moment.yaml")
    assert _fingerprint(model) == before


def test_budget_smaller_than_protected_tokens():
    model = tiny_model("llama")
    with pytest.raises(PolicyError, match=r"decode.budget.*at least 5.*got 4"):
        momentkv.patch(model, {"decode": {"budget": 4, "sinks": 2, "recent": 3, "scorers": [{"type": "ema"}]}})
    assert _fingerprint(model) == ("sdpa", False, None)


def test_unknown_policy_and_scorer():
    model = tiny_model("llama")
    with pytest.raises(PolicyError, match="not a built-in policy"):
        momentkv.patch(model, "no-such-policy.yaml")
    with pytest.raises(PolicyError, match="unknown scorer type 'emma'"):
        momentkv.patch(model, {"decode": {"budget": 4, "scorers": [{"type": "emma"}]}})
    assert _fingerprint(model) == ("sdpa", False, None)


def test_failed_repatch_keeps_the_working_patch():
    model = tiny_model("llama")
    inputs = prompts(1, 5)
    handle = momentkv.patch(model, {"decode": {"budget": 3, "scorers": [{"type": "recency"}]}})
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with pytest.raises(PolicyError):
        momentkv.patch(model, {"decode": {"budget": 0, "scorers": [{"type": "recency"}]}})
    assert momentkv.handle_of(model) is handle
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), expected)
    handle.remove()


def test_repatch_replaces_policy():
    model = tiny_model("llama")
    first = momentkv.patch(model, "full.yaml")
    second = momentkv.patch(model, {"decode": {"budget": 2, "scorers": [{"type": "recency"}]}})
    assert not first.active and second.active and momentkv.handle_of(model) is second
    model.generate(**prompts(1, 4), max_new_tokens=6, do_sample=False)
    assert second.stats()["evicted"] > 0
    momentkv.unpatch(model)
    assert _fingerprint(model) == ("sdpa", False, None)


def test_static_cache_and_assisted_decoding_refused():
    model = tiny_model("llama")
    with momentkv.patched(model, "moment.yaml"):
        with pytest.raises(PolicyError, match="cache_implementation='static'"):
            model.generate(**prompts(1, 4), max_new_tokens=3, cache_implementation="static")
        with pytest.raises(PolicyError, match="assisted decoding"):
            model.generate(**prompts(1, 4), max_new_tokens=3, assistant_model=tiny_model("llama"))


def test_uncompressed_layer_beyond_the_model():
    model = tiny_model("llama", layers=2)
    with pytest.raises(PolicyError, match=r"uncompressed_layers\[0\]: layer 5 does not exist, the model has 2 layers"):
        momentkv.patch(model, {"decode": {"budget": 4, "uncompressed_layers": [5], "scorers": [{"type": "ema"}]}})
    assert _fingerprint(model) == ("sdpa", False, None)


def test_evicting_cache_on_an_unpatched_model_raises_instead_of_going_stale():
    model = tiny_model("llama")
    handle = momentkv.patch(model, {"decode": {"budget": 2, "scorers": [{"type": "ema"}]}})
    cache = handle.new_cache()
    handle.remove()  # the model no longer routes attention to the cache
    inputs = prompts(1, 4)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
        model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
        with pytest.raises(PolicyError, match="attention of the last step never reached this cache"):
            model(input_ids=torch.tensor([[6]]), cache=cache, use_cache=True)
