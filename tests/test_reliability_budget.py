"""The budget holds however the generation length and the cache are given, and patching follows the model.

Each test reproduces a way the budget once stopped holding without a word (or a misleading error).
"""

import pytest
import torch
from transformers import GenerationConfig

import momentkv
from models import prompts, tiny_model
from momentkv import PolicyError
from momentkv.engine.checks import max_new_tokens

BUDGET = {"decode": {"budget": 8, "scorers": [{"type": "ema"}]}}
PROMPT = 15  # with transformers' default max_length (20), more than max_length - prompt tokens are generated

# (generate keywords, model.generation_config settings): both max_length and max_new_tokens set somewhere, or
# neither (transformers' default), each resolved by transformers in its own way.
LENGTH_SETTINGS = {
    "keyword max_length, generation_config max_new_tokens": (
        {"max_length": 15, "generation_config": GenerationConfig(max_new_tokens=40)}, {}),
    "keyword max_new_tokens, generation_config max_length": (
        {"max_new_tokens": 40, "generation_config": GenerationConfig(max_length=15)}, {}),
    "model max_new_tokens, keyword max_length": ({"max_length": 15}, {"max_new_tokens": 40}),
    "model max_length, keyword max_new_tokens": ({"max_new_tokens": 40}, {"max_length": 15}),
    "model max_new_tokens and max_length": ({}, {"max_new_tokens": 40, "max_length": 15}),
    "nothing set (transformers' default)": ({}, {}),
    "keyword max_length only": ({"max_length": 50}, {}),
    "generation_config max_length only": ({"generation_config": GenerationConfig(max_length=50)}, {}),
}


def _model_with(settings: dict):
    model = tiny_model("llama")
    for name, value in settings.items():
        setattr(model.generation_config, name, value)
    return model


def _generate_kwargs(kwargs: dict) -> dict:
    """The keywords with a fresh copy of any generation_config (generate must not see a shared one)."""
    kwargs = dict(kwargs)
    if "generation_config" in kwargs:
        config = GenerationConfig(**kwargs["generation_config"].to_diff_dict())
        config.pad_token_id, config.eos_token_id = 0, None
        kwargs["generation_config"] = config
    return kwargs


@pytest.mark.parametrize("case", sorted(LENGTH_SETTINGS))
def test_generated_length_follows_transformers(case):
    """The length momentkv expects is the length transformers generates (random weights, no end token)."""
    kwargs, settings = LENGTH_SETTINGS[case]
    inputs = prompts(length=PROMPT)
    model = _model_with(settings)
    out = model.generate(**inputs, **_generate_kwargs(kwargs), do_sample=False)
    generated = out.shape[1] - PROMPT
    assert max_new_tokens(model, _generate_kwargs(kwargs), PROMPT) == generated


@pytest.mark.parametrize("case", sorted(LENGTH_SETTINGS))
def test_budget_holds_whatever_sets_the_length(case):
    kwargs, settings = LENGTH_SETTINGS[case]
    model = _model_with(settings)
    with momentkv.patched(model, BUDGET) as handle:
        out = model.generate(**prompts(length=PROMPT), **_generate_kwargs(kwargs), do_sample=False)
        stats = handle.stats()
    generated = out.shape[1] - PROMPT
    assert generated > 8
    for layer in stats["layers"]:
        assert layer["generated_stored"] <= 8, (case, layer)
        assert layer["evicted"] == generated - 1 - 8  # the last token is never fed back


def test_prompt_given_as_embeddings_keeps_eviction_on():
    """With ``inputs_embeds`` the length cannot be told from max_length: the budget is enforced."""
    model = tiny_model("llama")
    embeds = model.get_input_embeddings()(prompts(length=PROMPT)["input_ids"])
    with momentkv.patched(model, BUDGET) as handle:
        model.generate(inputs_embeds=embeds, max_length=PROMPT + 20, do_sample=False)
        assert all(layer["generated_stored"] <= 8 for layer in handle.stats()["layers"])


def test_manual_loop_without_an_evicting_cache_is_refused():
    """``model(ids, use_cache=True)`` builds a DynamicCache that would hold every token: refused at the first
    step that attends to it, as generate() refuses a foreign cache."""
    model = tiny_model("llama")
    ids = prompts(length=6)["input_ids"]
    with momentkv.patched(model, {"decode": {"budget": 4, "scorers": [{"type": "ema"}]}}):
        with torch.no_grad():
            out = model(ids, use_cache=True)  # the prompt alone attends to nothing cached
            model(ids)  # a full forward without a cache is fine
            with pytest.raises(PolicyError, match=r"not momentkv.s .*handle\.new_cache\(\)"):
                model(ids[:, -1:], cache=out.past_key_values, use_cache=True)


def test_explicit_cache_does_not_score_when_the_budget_cannot_be_reached():
    """``generate(cache=handle.new_cache())`` is bit-identical to the unpatched model, as plain generate() is."""
    model = tiny_model("llama")
    inputs = prompts(batch=2, length=7)
    settings = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    reference = model.generate(**inputs, **settings)
    with momentkv.patched(model, {"decode": {"budget": 32, "scorers": [{"type": "ema"}]}}) as handle:
        cache = handle.new_cache()
        ours = model.generate(**inputs, cache=cache, **settings)
        assert all(layer.scores is None for layer in cache.layers)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.scores, reference.scores):
        assert torch.equal(a, b)


def test_explicit_cache_scores_when_the_budget_is_reached():
    model = tiny_model("llama")
    with momentkv.patched(model, {"decode": {"budget": 4, "scorers": [{"type": "ema"}]}}) as handle:
        cache = handle.new_cache()
        model.generate(**prompts(length=7), cache=cache, max_new_tokens=10, do_sample=False)
        assert all(layer["generated_stored"] <= 4 for layer in cache.stats()["layers"])


def test_patching_the_base_model_of_a_patched_model_names_the_base_model():
    model = tiny_model("llama")
    with momentkv.patched(model, BUDGET):
        with pytest.raises(PolicyError, match="base model without a language-model head"):
            momentkv.patch(model.model, BUDGET)


def test_attention_switch_after_patch_is_followed():
    """``set_attn_implementation('eager')`` after ``patch()``: generate keeps evicting with eager attention (the
    same tokens as a model patched while eager), and ``remove()`` restores eager, not the original sdpa."""
    inputs = prompts(batch=2, length=7)
    settings = dict(max_new_tokens=16, do_sample=False)
    expected_model = tiny_model("llama", "eager")
    with momentkv.patched(expected_model, BUDGET):
        expected = expected_model.generate(**inputs, **settings)
    model = tiny_model("llama", "sdpa")
    handle = momentkv.patch(model, BUDGET)
    model.set_attn_implementation("eager")
    out = model.generate(**inputs, **settings)
    assert torch.equal(out, expected)
    assert all(layer["evicted"] > 0 for layer in handle.stats()["layers"])
    assert model.config._attn_implementation == handle.attention_name != "eager"
    handle.remove()
    assert model.config._attn_implementation == "eager"


def test_attention_switch_to_an_unsupported_implementation_is_refused():
    model = tiny_model("llama", "sdpa")
    handle = momentkv.patch(model, BUDGET)
    model.config._attn_implementation = "flash_attention_2"  # what set_attn_implementation would leave
    with pytest.raises(PolicyError, match="switched to 'flash_attention_2' after momentkv.patch"):
        model.generate(**prompts(length=7), max_new_tokens=4)
    with pytest.raises(PolicyError, match="switched to 'flash_attention_2'"):
        handle.new_cache()
    model.config._attn_implementation = handle.attention_name
    handle.remove()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("policy", ["full.yaml", BUDGET])
def test_sliding_layers_hold_no_more_memory_than_stock(policy):
    """Mistral, window 16, 64-token prompt, 50 new tokens: stock's sliding layer shows 15 slots, but they are a
    view of the 16-slot buffer its last step concatenated, which stays allocated; the patched layer's 16 slots
    are all the memory it holds. Compared by the bytes of the storage each layer keeps alive."""
    model = tiny_model("mistral", sliding_window=16)
    inputs = prompts(batch=1, length=64)
    stock = model.generate(**inputs, max_new_tokens=50, do_sample=False, return_dict_in_generate=True)
    stock_bytes = [layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                   for layer in stock.past_key_values.layers]
    assert [layer.keys.shape[2] for layer in stock.past_key_values.layers] == [15, 15]
    with momentkv.patched(model, policy) as handle:
        model.generate(**inputs, max_new_tokens=50, do_sample=False)
        cache = handle.last_cache
    for layer, theirs in zip(cache.layers, stock_bytes):
        ours = layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        assert ours <= theirs, (ours, theirs)
        assert layer.stats()["kv_bytes"] == ours  # stats count the storage held, not a view of it


@torch.no_grad()
def test_eager_attention_weights_are_in_slot_order():
    """``output_attentions=True`` under eviction: column ``j`` of a layer's weights is the token at that layer's
    ``positions[..., j]`` (slot order, as documented), checked at layer 0, whose keys do not depend on what was
    evicted: the weights equal the full cache's, restricted to the kept tokens and renormalised."""
    from loops import positions_for, token_stream

    policy = {"decode": {"budget": 4, "scorers": [{"type": "instantaneous"}]}}
    inputs = prompts(length=6)
    stream = token_stream(1, 20)
    full_model, model = tiny_model("llama", "eager"), tiny_model("llama", "eager")
    handle = momentkv.patch(model, policy)
    cache = handle.new_cache()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full = full_model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    pos = positions_for(mask)[:, -1:] + 1
    for tok in stream:
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        step = dict(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    output_attentions=True)
        theirs = full_model(cache=full, **step).attentions[0][:, :, -1]  # (b, H, N) over every token
        ours = model(cache=cache, **step).attentions[0][:, :, -1]  # (b, H, S) over the slots
        pos = pos + 1
    layer = cache.layers[0]
    in_order = layer.positions.sort(dim=-1).values
    assert layer.evicted > 0 and not torch.equal(layer.positions, in_order)  # slot order is not sequence order
    group = ours.shape[1] // layer.positions.shape[1]
    slots = layer.positions.repeat_interleave(group, dim=1)  # (b, H, S): the token each query head's column holds
    kept = theirs.gather(-1, slots)
    torch.testing.assert_close(ours, kept / kept.sum(-1, keepdim=True))
    handle.remove()
