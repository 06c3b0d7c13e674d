"""Every unsupported model or request fails loudly, naming the reason and what is supported; never a no-op."""

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

import momentkv
from momentkv import PolicyError
from momentkv.patches import SUPPORTED_MODEL_TYPES
from models import prompts, tiny_model

POLICY = {"decode": {"budget": 2, "scorers": [{"type": "recency"}]}}


def test_phi_is_refused_with_the_supported_families():
    config = PhiConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=64)
    model = PhiForCausalLM(config).eval()
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    with pytest.raises(PolicyError, match=r"unsupported model type 'phi': momentkv supports " + supported):
        momentkv.patch(model, "moment.yaml")
    assert "generate" not in model.__dict__ and momentkv.handle_of(model) is None


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_flash_attention_2_is_refused(family):
    model = tiny_model(family)
    try:
        model.set_attn_implementation("flash_attention_2")
    except ImportError:  # transformers refuses it without the package: the state a flash-attention load leaves
        model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(PolicyError, match=r"'flash_attention_2'.*supports sdpa, eager.*attn_implementation='sdpa'"):
        momentkv.patch(model, "moment.yaml")
    assert momentkv.handle_of(model) is None


@pytest.mark.parametrize("how", ["wrapper", "module_compile", "submodule_forward"])
def test_compiled_models_are_refused(how):
    model = tiny_model("llama")
    target = model
    if how == "wrapper":
        target = torch.compile(model)
        expected = r"torch.compile wrapper"
    elif how == "module_compile":
        model.compile()
        expected = r"compiled in place \(LlamaForCausalLM.compile\(\)\)"
    else:  # the model's own forward may be compiled (tests/test_engine_compiled_decode.py); a submodule's not
        model.model.forward = torch.compile(model.model.forward)
        expected = r"compiled forward \(LlamaModel.forward"
    with pytest.raises(PolicyError, match=expected + r".*compile its forward, model.forward = torch.compile"):
        momentkv.patch(target, "moment.yaml")
    assert momentkv.handle_of(model) is None and model.config._attn_implementation == "sdpa"


def _refused_generate(model, handle, message, **kwargs):
    """A refused generate raises before any work: no cache is even created."""
    with pytest.raises(PolicyError, match=message):
        model.generate(**prompts(1, 4), max_new_tokens=3, do_sample=False, **kwargs)
    assert handle.last_cache is None


@pytest.mark.parametrize("impl", ["offloaded", "quantized", "offloaded_static", "sliding_window", "dynamic"])
def test_cache_implementation_passed_to_generate_is_refused(impl):
    model = tiny_model("qwen2")
    with momentkv.patched(model, POLICY) as handle:
        _refused_generate(model, handle, rf"^cache_implementation='{impl}'.*leave cache_implementation unset",
                          cache_implementation=impl)


@pytest.mark.parametrize("impl", ["static", "offloaded", "quantized"])
def test_cache_implementation_set_after_patching_is_refused_at_generate(impl):
    model = tiny_model("llama")
    with momentkv.patched(model, POLICY) as handle:
        model.generation_config.cache_implementation = impl
        _refused_generate(model, handle, rf"generation_config.cache_implementation='{impl}'")
        model.generation_config.cache_implementation = None
        model.generate(**prompts(1, 4), max_new_tokens=3, do_sample=False)
        assert handle.last_cache is not None


def test_cache_implementation_in_a_passed_generation_config_is_refused():
    model = tiny_model("llama")
    config = model.generation_config.__class__(cache_implementation="static", max_new_tokens=3)
    with momentkv.patched(model, POLICY) as handle:
        with pytest.raises(PolicyError, match="generation_config.cache_implementation='static'"):
            model.generate(**prompts(1, 4), generation_config=config)
        assert handle.last_cache is None


@pytest.mark.parametrize("setting", [
    {"prompt_lookup_num_tokens": 2}, {"assistant_early_exit": 1}, {"assistant_model": "draft"},
])
def test_assisted_decoding_is_refused(setting):
    model = tiny_model("mistral")
    if "assistant_model" in setting:
        setting = {"assistant_model": tiny_model("mistral", seed=1)}
    name = next(iter(setting))
    with momentkv.patched(model, POLICY) as handle:
        _refused_generate(model, handle, rf"{name} asks for assisted decoding.*greedy, sampling and beam search",
                          **setting)


def test_assisted_decoding_in_generation_config_is_refused():
    model = tiny_model("llama")
    with momentkv.patched(model, POLICY) as handle:
        model.generation_config.prompt_lookup_num_tokens = 2
        _refused_generate(model, handle, r"generation_config.prompt_lookup_num_tokens asks for assisted decoding")


def test_generate_without_cache_is_refused_not_silently_unbounded():
    model = tiny_model("llama")
    with momentkv.patched(model, POLICY) as handle:
        _refused_generate(model, handle, r"^use_cache=False: generate would keep no KV cache", use_cache=False)
        model.generation_config.use_cache = False
        _refused_generate(model, handle, r"generation_config.use_cache=False")
        # An explicit keyword overrides the config, as in generate itself.
        model.generate(**prompts(1, 4), max_new_tokens=4, do_sample=False, use_cache=True)
        assert handle.stats()["evicted"] > 0


def test_foreign_cache_object_is_refused():
    from transformers import DynamicCache

    model = tiny_model("llama")
    with momentkv.patched(model, POLICY) as handle:
        _refused_generate(model, handle, r"a DynamicCache was passed.*handle.new_cache\(\)", cache=DynamicCache())


@pytest.mark.parametrize("positional", [False, True])
def test_empty_prompt_is_refused_clearly(positional):
    """transformers itself fails deep inside the model (a reshape of 0 elements); momentkv names the problem."""
    model = tiny_model("llama")
    empty = torch.zeros((2, 0), dtype=torch.long)
    with momentkv.patched(model, POLICY) as handle:
        with pytest.raises(PolicyError, match=r"an empty prompt \(input_ids of shape \(2, 0\)\).*at least one token"):
            if positional:
                model.generate(empty, max_new_tokens=3)
            else:
                model.generate(input_ids=empty, attention_mask=empty, max_new_tokens=3)
        assert handle.last_cache is None
