"""Defects a new user met, each pinned by the test that reproduces it."""

import copy

import pytest
import torch

import momentkv
from momentkv import testing
from loops import oracle_run, physical_run, positions_for
from models import FAMILIES, prompts, tiny_model
from oracle import EngineChoices
from momentkv import PolicyError
from momentkv.scoring import Scorer
from scratch import scratch_scorer

UNEVEN = {
    "uncompressed-layer": {"decode": {"budget": 3, "uncompressed_layers": [1], "scorers": [{"type": "ema"}]}},
    "budget-schedule": {"decode": {"budget": [3, 6], "scorers": [{"type": "instantaneous"}]}},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(UNEVEN))
def test_layers_holding_different_slot_counts_match_the_oracle(family, attn, name):
    """Each layer attends with a mask sized to its own keys, whatever the mask's reference layer holds."""
    policy = UNEVEN[name]
    inputs = prompts(batch=3, length=7)
    choices = EngineChoices()  # the oracle checks each eviction and follows the engine through near-ties
    physical, cache = physical_run(tiny_model(family, attn), policy, inputs, steps=12, on_step=choices)
    oracle = oracle_run(tiny_model(family, "eager"), policy, inputs, steps=12, follow=choices)
    stored = [layer.stored for layer in cache.layers]
    assert stored[0] != stored[1]  # the layers really differ
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    assert choices.checked > 0


def test_padded_generate_with_an_uncompressed_last_layer():
    model = tiny_model("llama", layers=3)
    with momentkv.patched(model, {"decode": {"budget": 4, "uncompressed_layers": [2],
                                             "scorers": [{"type": "ema"}]}}) as handle:
        model.generate(**prompts(batch=2, length=8), max_new_tokens=12, do_sample=False)
        stored = [layer["stored"] for layer in handle.stats()["layers"]]
    assert stored == [8 + 4, 8 + 4, 8 + 11]


def test_deep_copy_of_a_patched_model_runs_its_own_weights():
    model = tiny_model("llama")
    policy = {"decode": {"budget": 3, "scorers": [{"type": "ema"}]}}
    handle = momentkv.patch(model, policy)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)
    inputs = prompts(batch=2, length=6)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    twin_out = twin.generate(**inputs, max_new_tokens=10, do_sample=False)
    # What a separately patched model with the twin's weights generates.
    reference = tiny_model("llama")
    with torch.no_grad():
        reference.lm_head.weight.mul_(-1.0)
    with momentkv.patched(reference, policy):
        expected = reference.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(twin_out, expected) and not torch.equal(twin_out, out)
    twin_handle = momentkv.handle_of(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.active
    assert twin_handle.stats()["evicted"] > 0 and twin_handle.model is twin
    twin_handle.remove()
    assert "generate" not in twin.__dict__ and twin.config._attn_implementation == "sdpa"
    assert momentkv.handle_of(model) is handle and handle.active  # the original keeps its patch
    handle.remove()


def _stock_slots(model, inputs, new_tokens):
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    return out.sequences, [layer.keys.shape[2] for layer in out.past_key_values.layers]


@pytest.mark.parametrize("policy", ["full.yaml", {"decode": {"budget": 32, "sinks": 2, "scorers": [{"type": "ema"}]}},
                                    {"decode": {"budget": 8, "recent": 2, "scorers": [{"type": "ema"}]}}])
def test_sliding_layers_never_store_what_no_query_can_see(policy):
    model = tiny_model("mistral", sliding_window=16)
    inputs = prompts(batch=2, length=64)
    stock_tokens, stock_slots = _stock_slots(model, inputs, 50)
    with momentkv.patched(model, policy) as handle:
        tokens = model.generate(**inputs, max_new_tokens=50, do_sample=False)
        stats = handle.stats()
    # transformers keeps window - 1 slots (a slice of a window-long buffer); the patched layer at most window.
    assert stock_slots == [15, 15]
    assert all(layer["stored"] <= 16 and layer["peak"] <= 64 for layer in stats["layers"])
    if policy == "full.yaml":
        assert torch.equal(tokens, stock_tokens)  # dropping dead tokens changes nothing the model computes


def test_sliding_layers_match_the_oracle_with_padding():
    policy = {"decode": {"budget": 4, "sinks": 1, "scorers": [{"type": "ema"}]}}
    inputs = prompts(batch=3, length=12)
    choices = EngineChoices()
    physical, cache = physical_run(tiny_model("mistral", sliding_window=6), policy, inputs, steps=14, on_step=choices)
    oracle = oracle_run(tiny_model("mistral", "eager", sliding_window=6), policy, inputs, steps=14, follow=choices)
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    assert choices.checked > 0
    assert all(layer.stored <= 6 for layer in cache.layers)


def test_qwen2_sliding_layers_are_bounded_and_full_layers_kept():
    model = tiny_model("qwen2", layers=2, use_sliding_window=True, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    inputs = prompts(batch=1, length=20)
    stock, _ = _stock_slots(model, inputs, 12)
    with momentkv.patched(model, "full.yaml") as handle:
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        stored = [layer["stored"] for layer in handle.stats()["layers"]]
    assert torch.equal(tokens, stock)
    assert stored[0] <= 8 and stored[1] == 20 + 11


def test_a_new_user_turn_is_context_kept_whole():
    model = tiny_model("llama")
    policy = {"decode": {"budget": 4, "scorers": [{"type": "ema"}]}}
    inputs = prompts(batch=1, length=6)
    with momentkv.patched(model, policy) as handle:
        first = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        cache = handle.last_cache
        turn = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
        conversation = torch.cat([first, turn], dim=-1)
        second = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                cache=cache, max_new_tokens=12, do_sample=False)
    assert second.shape[1] == conversation.shape[1] + 12
    turn_positions = torch.arange(first.shape[1], conversation.shape[1])
    for layer in cache.layers:
        held = layer.positions[0, :, :, None] == turn_positions  # (kv, S, 20)
        assert bool(held.any(dim=1).all()), "a token of the new user turn was evicted"
        assert layer.stored - layer.context_slots <= 4


def test_a_chunk_fed_after_decoding_is_context():
    model = tiny_model("qwen3")
    handle = momentkv.patch(model, {"decode": {"budget": 3, "scorers": [{"type": "accumulated"}]}})
    cache = handle.new_cache()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids[:, :5], cache=cache, use_cache=True)
        for t in range(5, 15):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        model(input_ids=ids[:, 15:35], cache=cache, use_cache=True)
        for t in range(35, 40):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
    for layer in cache.layers:
        positions = layer.positions[0, 0]
        assert set(range(15, 35)) <= set(positions.tolist())
        assert layer.context_slots == 25 and layer.stored == 25 + 3
    handle.remove()


def test_not_a_model_and_a_base_model_are_refused():
    with pytest.raises(PolicyError, match="expected a transformers model"):
        momentkv.patch(object())
    model = tiny_model("llama")
    with pytest.raises(PolicyError, match="base model without a language-model head"):
        momentkv.patch(model.model)
    assert momentkv.handle_of(model.model) is None


def test_a_model_converted_to_float64_after_patch_is_refused():
    model = tiny_model("llama")
    handle = momentkv.patch(model, "moment.yaml")
    model.to(torch.float64)
    with pytest.raises(PolicyError, match="unsupported parameter dtype float64"):
        model.generate(**prompts(1, 5), max_new_tokens=3)
    with pytest.raises(PolicyError, match="float64"):
        handle.new_cache()
    handle.remove()


class _WrongShape(Scorer):
    needs_attention = False

    def update(self, ctx):
        return ctx.positions[..., :1].float()


class _NaN(Scorer):
    needs_attention = False

    def update(self, ctx):
        return torch.full(ctx.positions.shape, float("nan"))


def test_a_scorer_of_the_wrong_shape_is_named():
    model = tiny_model("llama")
    with scratch_scorer("test_wrong_shape", _WrongShape), \
            momentkv.patched(model, {"decode": {"budget": 2, "scorers": [{"type": "test_wrong_shape"}]}}):
        with pytest.raises(PolicyError, match="scorer 'test_wrong_shape' returned \\(1, 2, 1\\)"):
            model.generate(**prompts(1, 5), max_new_tokens=6)


def test_nan_scores_are_caught_in_debug_mode(monkeypatch):
    model = tiny_model("llama")
    policy = {"decode": {"budget": 2, "scorers": [{"type": "test_nan", "normalize": "rank"}]}}
    with scratch_scorer("test_nan", _NaN), momentkv.patched(model, policy):
        model.generate(**prompts(1, 5), max_new_tokens=6)  # not checked by default (the hot path)
        monkeypatch.setenv("MOMENTKV_DEBUG", "1")
        with pytest.raises(PolicyError, match="scorer 'test_nan' returned a NaN"):
            model.generate(**prompts(1, 5), max_new_tokens=6)


def test_nested_patched_blocks_restore_the_outer_patch():
    model = tiny_model("llama")
    with momentkv.patched(model, "recency.yaml") as outer:
        with momentkv.patched(model, "h2o.yaml") as inner:
            assert momentkv.handle_of(model) is inner and not outer.active
        assert momentkv.handle_of(model) is outer and outer.active
        model.generate(**prompts(1, 5), max_new_tokens=3)
        assert outer.stats()["seen"] > 0
    assert momentkv.handle_of(model) is None and "generate" not in model.__dict__


def test_scope_all_holds_its_budget_with_one_recent_token():
    model = tiny_model("llama")
    policy = {"decode": {"budget": 1, "recent": 1, "scope": "all", "scorers": [{"type": "accumulated"}]}}
    steps = []
    physical_run(model, policy, prompts(1, 2), steps=2,
                 on_step=lambda step, cache: steps.append([layer.stored for layer in cache.layers]))
    assert steps[1:] == [[1, 1], [1, 1]]


@pytest.mark.parametrize("prefill", [{"type": "knorm", "capacity": 1}, {"type": "snapkv", "capacity": 3, "window": 2}])
def test_scope_all_with_a_prefill_compressor(prefill):
    """The last prompt query's attention follows the compressor's choice before it is folded in."""
    policy = {"prefill": prefill, "decode": {"budget": 2, "scope": "all", "scorers": [{"type": "accumulated"}]}}
    for prompt_len in (2, 3, 6):
        trace = testing.DecodeTrace(seed=prompt_len, batch=2, kv_heads=2, head_dim=4, prompt_len=prompt_len,
                                    steps=3, sharpness=(1.0, 1.0, 1.0))
        testing.check_invariants(policy, trace, num_layers=2)
    logits, _ = physical_run(tiny_model("qwen2"), policy, prompts(batch=2, length=7), steps=5)
    assert torch.isfinite(logits).all()


def test_manual_loop_positions_follow_tokens_seen():
    model = tiny_model("mistral", sliding_window=4)
    inputs = prompts(batch=2, length=9)
    handle = momentkv.patch(model, {"decode": {"budget": 3, "scorers": [{"type": "ema"}]}})
    cache = handle.new_cache()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        model(**inputs, position_ids=positions_for(mask), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 9 and all(layer.stored == 9 for layer in cache.layers)
    handle.remove()
