"""Every seam listed in docs/architecture.md ("What momentkv reads that transformers, PyTorch or lm-eval do not
promise") still exists in the installed versions: an upgrade that removes or changes one fails here, by name.

One test per row of that table, in its order; a row added to the table gets its test here.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from momentkv.patches import FAMILIES


def _parameters(fn) -> dict:
    return inspect.signature(fn).parameters


def _takes_var_keywords(fn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in _parameters(fn).values())


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------- transformers
def test_config_attn_implementation_names_the_running_attention():
    model = _tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager", "set_attn_implementation no longer shows in the config"


def _attention_classes(module):
    """The classes of a modeling module whose ``forward`` calls the attention function it looks up."""
    for name, cls in vars(module).items():
        forward = getattr(cls, "forward", None) if isinstance(cls, type) else None
        if forward is not None and getattr(cls, "__module__", None) == module.__name__:
            source = textwrap.dedent(inspect.getsource(forward))
            if "attention_interface(" in source:
                yield name, ast.parse(source)


@pytest.mark.parametrize("adapter", FAMILIES,
                         ids=lambda a: a.model_type)
def test_update_kwargs_are_the_dict_unpacked_into_the_attention_function(adapter):
    """Read from the source: ``cache.update(..., kwargs=X)`` and ``attention_interface(..., **X)``, one name X."""
    import importlib

    classes = list(_attention_classes(importlib.import_module(adapter.modeling_module)))
    assert classes, f"{adapter.modeling_module}: no attention class calls attention_interface(...)"
    for name, tree in classes:
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        passed = {k.value.id for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr == "update"
                  for k in c.keywords if k.arg == "kwargs" and isinstance(k.value, ast.Name)}
        unpacked = {k.value.id for c in calls if isinstance(c.func, ast.Name) and c.func.id == "attention_interface"
                    for k in c.keywords if k.arg is None and isinstance(k.value, ast.Name)}
        assert passed and passed <= unpacked, (
            f"{name}.forward: cache.update(..., kwargs=...) passes {sorted(passed)}, the attention function "
            f"receives **{sorted(unpacked)}: the cache layer's record would not reach the attention function"
        )


def test_a_write_into_update_kwargs_reaches_the_attention_function():
    from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    received = []

    class WritingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, kwargs=None, **rest):
            assert kwargs is not None, "the attention module no longer passes kwargs= to cache.update"
            kwargs["seam_probe"] = layer_idx
            return super().update(key_states, value_states, layer_idx, *args, kwargs=kwargs, **rest)

    def probe_attention(module, query, key, value, attention_mask, **kwargs):
        received.append(kwargs.pop("seam_probe", None))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("private_seams_probe", probe_attention)
    AttentionMaskInterface.register("private_seams_probe", sdpa_mask)
    model = _tiny_llama()
    model.set_attn_implementation("private_seams_probe")
    cache_name = "cache" if "cache" in _parameters(model.forward) else "past_key_values"
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), **{cache_name: WritingCache(config=model.config)}, use_cache=True)
    assert received == [0, 1], f"the attention function received {received}, not each layer's write"


def test_generate_names_its_cache_keywords():
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", None)
    assert names is not None, "transformers.generation.utils.ALL_CACHE_NAMES is gone"
    assert "cache" in names


def test_generation_config_gives_its_default_max_length():
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params()
    assert defaults.get("max_length") == 20


def test_generate_still_resolves_lengths_where_momentkv_follows_it():
    from transformers.generation.utils import GenerationMixin

    for name in ("_prepare_generation_config", "_prepare_generated_length"):
        assert callable(getattr(GenerationMixin, name, None)), f"GenerationMixin.{name} is gone: re-read it"


def test_sdpa_attention_forward_is_importable_with_its_parameters():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = _parameters(sdpa_attention_forward)
    assert list(params)[:5] == ["module", "query", "key", "value", "attention_mask"]
    assert {"dropout", "scaling"} <= set(params) and _takes_var_keywords(sdpa_attention_forward)


@pytest.mark.parametrize("name", ["sdpa_mask", "eager_mask"])
def test_mask_functions_are_importable_with_their_parameters(name):
    from transformers import masking_utils

    mask = getattr(masking_utils, name, None)
    assert callable(mask), f"transformers.masking_utils.{name} is gone"
    assert {"batch_size", "q_length", "kv_length", "attention_mask"} <= set(_parameters(mask))


@pytest.mark.parametrize("adapter", FAMILIES,
                         ids=lambda a: a.model_type)
def test_each_family_has_its_eager_attention_function(adapter):
    eager = adapter.eager_attention()
    params = _parameters(eager)
    assert list(params)[:5] == ["module", "query", "key", "value", "attention_mask"]
    assert {"dropout", "scaling"} <= set(params)


def test_models_carry_the_tensor_parallel_marker():
    model = _tiny_llama()
    assert hasattr(model, "_tp_size"), "PreTrainedModel no longer sets _tp_size"
    assert model._tp_size in (None, 1)


def test_compiled_models_keep_their_markers():
    wrapped = torch.compile(torch.nn.Linear(2, 2))  # compiles lazily: nothing is compiled here
    assert isinstance(wrapped._orig_mod, torch.nn.Linear)
    module = torch.nn.Linear(2, 2)
    module.compile()
    assert module._compiled_call_impl is not None
    assert hasattr(torch.compile(torch.nn.Linear(2, 2).forward), "_torchdynamo_orig_callable")


# ------------------------------------------------------------------------------------------- PyTorch
def test_torch_dispatch_mode_sees_each_operation():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.ones(3)
    with Counting():
        (x + 1).mul_(2)
    assert len(seen) == 2


# ------------------------------------------------------------------------------------------- lm-eval
def test_lm_eval_command_line_runs_in_process():
    pytest.importorskip("lm_eval", reason="lm-eval is optional (pip install 'momentkv[lm-eval]'); its seams "
                        "matter only where it is installed")
    from lm_eval._cli import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    assert callable(getattr(HarnessCLI, "parse_args", None)) and callable(getattr(HarnessCLI, "execute", None))
    assert callable(getattr(EvaluatorConfig, "load_yaml_config", None))


def test_hflm_generates_through_model_generate():
    pytest.importorskip("lm_eval", reason="lm-eval is optional (pip install 'momentkv[lm-eval]'); its seams "
                        "matter only where it is installed")
    from lm_eval.models.huggingface import HFLM

    method = getattr(HFLM, "_model_generate", None)
    assert callable(method), "HFLM._model_generate is gone: the momentkv model would tally no generation"
    assert list(_parameters(method))[:4] == ["self", "context", "max_length", "stop"] and _takes_var_keywords(method)
    assert "self._model_generate(" in inspect.getsource(HFLM.generate_until)
