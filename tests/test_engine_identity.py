"""With a budget the output never reaches, a patched model generates exactly what the unpatched one does."""

import pytest
import torch

import momentkv
from models import FAMILIES, prompts, tiny_model

NEW_TOKENS = 12
LARGE = {"name": "large", "decode": {"budget": 64, "recent": 4, "sinks": 2,
                                     "scorers": [{"type": "ema", "alpha": 0.9, "bias_correction": True}]}}


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_bit_identical_when_budget_not_reached(family, attn, batch):
    model = tiny_model(family, attn)
    inputs = prompts(batch=batch, length=9)
    reference = _generate(model, inputs)
    with momentkv.patched(model, LARGE) as handle:
        patched = _generate(model, inputs)
        stats = handle.stats()
    assert torch.equal(patched, reference)
    assert stats["evicted"] == 0 and stats["seen"] == 9 + NEW_TOKENS - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bit_identical_when_budget_not_reached(family):
    model = tiny_model(family)
    inputs = prompts(batch=2, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = model.generate(**inputs, **kwargs)
    with momentkv.patched(model, LARGE):
        patched = model.generate(**inputs, **kwargs)
    for ref, got in zip(reference.logits, patched.logits):
        assert torch.equal(ref, got)


def test_sampling_identical_with_same_seed():
    model = tiny_model("qwen2")
    inputs = prompts(batch=2, length=5)
    torch.manual_seed(3)
    reference = model.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=20)
    with momentkv.patched(model, LARGE):
        torch.manual_seed(3)
        patched = model.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=20)
    assert torch.equal(patched, reference)


def test_num_return_sequences_identical():
    model = tiny_model("llama")
    inputs = prompts(batch=2, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3)
    torch.manual_seed(1)
    reference = model.generate(**inputs, **kwargs)
    with momentkv.patched(model, LARGE) as handle:
        torch.manual_seed(1)
        patched = model.generate(**inputs, **kwargs)
        assert handle.last_cache.layers[0].keys.shape[0] == 6
    assert torch.equal(patched, reference)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_beam_search_identical(family):
    model = tiny_model(family)
    inputs = prompts(batch=2, length=6)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    reference = model.generate(**inputs, **kwargs)
    with momentkv.patched(model, LARGE):
        patched = model.generate(**inputs, **kwargs)
    assert torch.equal(patched, reference)


def test_remove_restores_bit_identical_outputs_and_config():
    model = tiny_model("mistral")
    inputs = prompts(batch=2, length=6)
    before_config = model.config.to_dict()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _generate(model, inputs)
    handle = momentkv.patch(model, {"decode": {"budget": 2, "scorers": [{"type": "instantaneous"}]}})
    changed = _generate(model, inputs)
    handle.remove()
    handle.remove()  # harmless
    after = _generate(model, inputs)
    assert not torch.equal(changed, reference)  # the patch did something
    assert torch.equal(after, reference)
    assert model.config.to_dict() == before_config
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_two_models_carry_different_policies():
    a, b = tiny_model("llama"), tiny_model("llama")
    inputs = prompts(batch=1, length=6)
    small = {"decode": {"budget": 2, "scorers": [{"type": "recency"}]}}
    ha = momentkv.patch(a, small)
    hb = momentkv.patch(b, "full.yaml")
    out_a, out_b = _generate(a, inputs), _generate(b, inputs)
    assert max(layer["generated_stored"] for layer in ha.stats()["layers"]) == 2
    assert hb.stats()["evicted"] == 0
    ha.remove()
    hb.remove()
    assert torch.equal(out_b, _generate(tiny_model("llama"), inputs))
    assert not torch.equal(out_a, out_b)
