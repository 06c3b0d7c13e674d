"""Atomic patching: a failed ``patch()`` leaves every bit of the model as it was; remove() is idempotent."""

import pytest
import torch
from transformers import LlamaForCausalLM

import momentkv
from momentkv import PolicyError
from models import prompts, tiny_model

POLICY = {"decode": {"budget": 3, "scorers": [{"type": "recency"}]}}


def _logits(model, inputs):
    try:
        return model(**inputs).logits
    except (ImportError, AttributeError, RuntimeError, ValueError) as error:  # spoiled: fails alike before and after
        return f"{type(error).__name__}: {error}"


@torch.no_grad()
def _snapshot(model) -> dict:
    """Everything ``patch`` could change: config, attributes of the model and of every module, weights, outputs."""
    inputs = prompts(2, 6)
    return {
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
        "generation_config": model.generation_config.to_dict(),
        "model_dict": sorted(model.__dict__),
        "generate": model.__dict__.get("generate"),  # the instance's own generate (None: the class's)
        "modules": {name: sorted(m.__dict__) for name, m in model.named_modules()},
        "module_attrs": {name: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, bool))}
                         for name, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "logits": _logits(model, inputs),
        "handle": momentkv.handle_of(model),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key == "state":
            assert before[key].keys() == after[key].keys()
            for name in before[key]:
                assert torch.equal(before[key][name], after[key][name]), name
        elif key == "logits" and isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key])
        else:
            assert before[key] == after[key], key


def _float64(model):
    return model.to(torch.float64), POLICY


def _missing(attribute):
    def spoil(model):
        delattr(model.model.layers[1].self_attn, attribute)
        return model, POLICY
    spoil.__name__ = f"missing_{attribute}"
    return spoil


def _wrong_layer_idx(model):
    model.model.layers[1].self_attn.layer_idx = 0
    return model, POLICY


def _generation_setting(name, value):
    def spoil(model):
        setattr(model.generation_config, name, value)
        return model, POLICY
    spoil.__name__ = f"{name}_{value}"
    return spoil


def _flash_attention(model):
    try:
        model.set_attn_implementation("flash_attention_2")
    except (ImportError, ValueError):
        # flash-attn is not installed: transformers raises ImportError, or from 5.25 ValueError when it cannot
        # reach the hub's kernel in its place (offline). Put the model in the state loading with it gives.
        model.config._attn_implementation_internal = "flash_attention_2"
    return model, POLICY


def _bad_policy(model):
    return model, {"decode": {"budget": 2, "sinks": 2, "recent": 2, "scorers": [{"type": "ema"}]}}


FAILURES = {
    "float64": (_float64, r"unsupported parameter dtype float64.*float32, float16 and bfloat16"),
    "no_groups": (_missing("num_key_value_groups"), r"layer 1: LlamaAttention lacks num_key_value_groups"),
    "no_scaling": (_missing("scaling"), r"layer 1: LlamaAttention lacks scaling"),
    "no_layer_idx": (_missing("layer_idx"), r"layer 1: LlamaAttention lacks layer_idx"),
    "wrong_layer_idx": (_wrong_layer_idx, r"layer 1: LlamaAttention.layer_idx is 0, expected 1"),
    "static": (_generation_setting("cache_implementation", "static"), r"cache_implementation='static'"),
    "offloaded": (_generation_setting("cache_implementation", "offloaded"), r"cache_implementation='offloaded'"),
    "quantized": (_generation_setting("cache_implementation", "quantized"), r"cache_implementation='quantized'"),
    "prompt_lookup": (_generation_setting("prompt_lookup_num_tokens", 3), r"prompt_lookup_num_tokens.*assisted"),
    "no_cache": (_generation_setting("use_cache", False), r"use_cache=False"),
    "flash_attention_2": (_flash_attention, r"'flash_attention_2'.*supports sdpa, eager"),
    "bad_policy": (_bad_policy, r"decode.budget"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_patch_leaves_model_untouched(case):
    spoil, message = FAILURES[case]
    model, policy = spoil(tiny_model("llama"))
    before = _snapshot(model)
    with pytest.raises(PolicyError, match=message):
        momentkv.patch(model, policy)
    _assert_same(before, _snapshot(model))


def test_failed_patch_of_a_compiled_wrapper_leaves_the_model_untouched():
    model = tiny_model("llama")
    compiled = torch.compile(model)
    before = _snapshot(model)  # (after wrapping: compiling sets attributes of its own)
    with pytest.raises(PolicyError, match=r"torch.compile wrapper \(OptimizedModule\).*momentkv.patch\(compiled._orig_mod\)"):
        momentkv.patch(compiled, POLICY)
    _assert_same(before, _snapshot(model))
    assert momentkv.handle_of(compiled) is None


def test_failed_repatch_keeps_the_first_patch_bit_for_bit():
    model = tiny_model("llama")
    handle = momentkv.patch(model, POLICY)
    model.generation_config.prompt_lookup_num_tokens = 3
    before = _snapshot(model)
    with pytest.raises(PolicyError, match="prompt_lookup_num_tokens"):
        momentkv.patch(model, "moment.yaml")
    _assert_same(before, _snapshot(model))
    assert handle.active and momentkv.handle_of(model) is handle
    handle.remove()


def test_install_failure_rolls_back(monkeypatch):
    """A failure inside the switch itself (after validation) restores the model and any previous patch."""
    model = tiny_model("llama")
    pristine = _snapshot(model)
    first = momentkv.patch(model, POLICY)
    patched_state = _snapshot(model)
    original = LlamaForCausalLM.set_attn_implementation
    calls = []

    def flaky(self, name):
        original(self, name)  # the switch happens, then something fails
        calls.append(name)
        if name.startswith("momentkv") and len(calls) == 2:
            raise RuntimeError("simulated failure while switching")

    monkeypatch.setattr(LlamaForCausalLM, "set_attn_implementation", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        momentkv.patch(model, "moment.yaml")  # calls: remove -> sdpa, install -> momentkv (fails), restore
    monkeypatch.undo()
    after = _snapshot(model)
    assert callable(after.pop("generate")) and callable(patched_state.pop("generate"))  # reinstalled: a new closure
    _assert_same(patched_state, after)
    assert momentkv.handle_of(model) is first and first.active
    first.remove()
    _assert_same(pristine, _snapshot(model))


def test_remove_twice_and_stale_handles_are_harmless():
    model = tiny_model("llama")
    pristine = _snapshot(model)
    first = momentkv.patch(model, POLICY)
    second = momentkv.patch(model, "moment.yaml")
    first.remove()  # replaced: changes nothing
    assert second.active and momentkv.handle_of(model) is second
    assert model.config._attn_implementation.startswith("momentkv")
    second.remove()
    second.remove()
    momentkv.unpatch(model)
    first.remove()
    _assert_same(pristine, _snapshot(model))
    assert repr(second) == "<momentkv.Handle policy='moment' removed>"


def test_patch_remove_cycles_leave_no_trace():
    model = tiny_model("qwen3", attn="eager")
    pristine = _snapshot(model)
    for policy in ("moment.yaml", "h2o.yaml", POLICY, "full.yaml"):
        with momentkv.patched(model, policy):
            model.generate(**prompts(2, 5), max_new_tokens=6, do_sample=False)
    _assert_same(pristine, _snapshot(model))
