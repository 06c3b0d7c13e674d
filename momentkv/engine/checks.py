"""What ``patch`` and a patched ``generate`` check before anything changes: the model, its dtype and
attention modules, and the generation settings an evicting cache cannot honour. Each failure is a
:class:`~momentkv.PolicyError` that says what is wrong and what to do.
"""

from __future__ import annotations

import torch

from momentkv.engine.cache import EvictingCache
from momentkv.errors import PolicyError
from momentkv.patches import SUPPORTED_MODEL_TYPES, adapter_for

SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Attributes of each layer's attention module that the engine and the attention functions read.
ATTENTION_ATTRIBUTES = ("layer_idx", "scaling", "num_key_value_groups")
# generate() settings that switch to assisted decoding, which crops the cache after rejected drafts.
ASSISTED_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _compiled_part(model) -> str | None:
    """How ``model`` was compiled in a way momentkv cannot route (a ``torch.compile`` wrapper, a module's
    ``.compile()``), or ``None``. A compiled ``forward`` attribute is not listed: a patched ``generate`` routes
    it (:mod:`~momentkv.engine.compiled_decode`)."""
    if getattr(model, "_orig_mod", None) is not None:
        return f"a torch.compile wrapper ({type(model).__name__})"
    modules = model.modules() if isinstance(model, torch.nn.Module) else [model]
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is not None:
            return f"a module compiled in place ({type(module).__name__}.compile())"
        if module is not model and hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"):
            return f"a submodule's compiled forward ({type(module).__name__}.forward = torch.compile(...))"
    return None


def check_not_compiled(model) -> None:
    compiled = _compiled_part(model)
    if compiled is not None:
        raise PolicyError(
            f"the model is {compiled}: it would compile every step of the growing cache, and a wrapper would "
            "leave the model underneath unpatched; patch the uncompiled model (for a wrapper, "
            "momentkv.patch(compiled._orig_mod)) and compile its forward, model.forward = "
            "torch.compile(model.forward), or pass generate(..., compile_config=...): momentkv then runs the "
            "prompt and the growing cache eagerly and the steps after every budget is full compiled"
        )


def check_dtype(model) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unsupported = sorted(str(d).replace("torch.", "") for d in dtypes if d not in SUPPORTED_DTYPES)
    if unsupported:
        raise PolicyError(
            f"unsupported parameter dtype {', '.join(unsupported)}: momentkv supports float32, float16 and "
            "bfloat16; convert the model with model.to(torch.float32) (or bfloat16/float16) first"
        )


def _attention_modules(model) -> list:
    """Each decoder layer's ``self_attn`` module, in layer order."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise PolicyError(
            f"{type(model).__name__} has no decoder layers where its family keeps them (model.base_model.layers): "
            "momentkv patches the transformers classes of its supported families, unmodified"
        )
    return [getattr(layer, "self_attn", None) for layer in layers]


def check_attention_modules(model, text_config) -> None:
    """The attention modules have the shape the engine relies on: one per layer, knowing its index and scale."""
    modules = _attention_modules(model)
    problems = []
    if len(modules) != text_config.num_hidden_layers:
        problems.append(f"the model has {len(modules)} decoder layers, its config says {text_config.num_hidden_layers}")
    groups = text_config.num_attention_heads // text_config.num_key_value_heads
    for idx, module in enumerate(modules):
        if module is None:
            problems.append(f"layer {idx} has no self_attn module")
            continue
        missing = [name for name in ATTENTION_ATTRIBUTES if not hasattr(module, name)]
        if missing:
            problems.append(f"layer {idx}: {type(module).__name__} lacks {', '.join(missing)}")
        elif module.layer_idx != idx:
            problems.append(f"layer {idx}: {type(module).__name__}.layer_idx is {module.layer_idx!r}, expected {idx}")
        elif module.num_key_value_groups != groups:
            problems.append(
                f"layer {idx}: {type(module).__name__}.num_key_value_groups is {module.num_key_value_groups!r}, "
                f"the config gives {groups}"
            )
    if problems:
        raise PolicyError(
            [f"unexpected attention module structure: {p}; momentkv needs the family's transformers attention "
             f"modules with {', '.join(ATTENTION_ATTRIBUTES)}" for p in problems]
        )


def check_generation_config(config, where: str = "generation_config.") -> None:
    """Refuse generation settings the evicting cache cannot honour (in a GenerationConfig or generate kwargs)."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    impl = get("cache_implementation")
    if impl is not None:
        raise PolicyError(
            f"{where}cache_implementation={impl!r}: momentkv brings its own evicting cache, which generate cannot "
            "combine with a cache implementation; leave cache_implementation unset (None)"
        )
    assisted = [name for name in ASSISTED_SETTINGS if get(name) not in (None, False)]
    if get("assistant_model") is not None:
        assisted.insert(0, "assistant_model")
    if assisted:
        raise PolicyError(
            f"{where}{assisted[0]} asks for assisted decoding, which rolls the cache back after rejected drafts; "
            "an evicting cache cannot do that; momentkv supports greedy, sampling and beam search"
        )
    if get("use_cache", True) is False:
        raise PolicyError(
            f"{where}use_cache=False: generate would keep no KV cache at all, so momentkv would bound nothing; "
            "set use_cache=True (the default)"
        )


def check_model(model, base_implementation: str | None = None):
    """Return the family adapter and base attention implementation, or raise ``PolicyError``.

    Checked in order: not a compiled model, a supported family, a model with a language-model head (a base
    model of a patched model says so, not that momentkv's attention is unsupported), a supported attention
    implementation, the parameters' dtype, the attention modules' structure, and the model's generation config.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise PolicyError(
            f"expected a transformers model (a torch.nn.Module with a config), got {type(model).__name__}: pass the "
            "model returned by AutoModelForCausalLM.from_pretrained (or momentkv.models.load)"
        )
    check_not_compiled(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = adapter_for(model_type) if model_type else None
    if adapter is None:
        raise PolicyError(
            f"unsupported model type {model_type!r}: momentkv supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    features = adapter.unsupported_features(config.get_text_config(decoder=True))
    if features:
        raise PolicyError(
            f"this {model_type} checkpoint uses {', '.join(features)}: momentkv does not serve this attention "
            f"feature, and would not run it approximately; momentkv supports {model_type} models without it"
        )
    if not callable(getattr(type(model), "generate", None)):
        raise PolicyError(
            f"{type(model).__name__} is a base model without a language-model head (it has no generate): patch the "
            f"causal LM that holds it (e.g. {model_type.capitalize()}ForCausalLM), whose generate() momentkv wraps"
        )
    implementation = base_implementation or config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise PolicyError(
            f"unsupported attention implementation {implementation!r}: momentkv needs the attention weights it "
            f"scores with, and supports {', '.join(SUPPORTED_ATTENTION)}; load the model with "
            "attn_implementation='sdpa' or call model.set_attn_implementation('sdpa') first"
        )
    check_dtype(model)
    check_attention_modules(model, config.get_text_config(decoder=True))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        check_generation_config(generation_config)
    return adapter, implementation


def _generation_setting(model, kwargs: dict, name: str):
    """``name`` as ``generate`` resolves it: a keyword, else the ``generation_config`` passed, else the model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def max_new_tokens(model, kwargs: dict, prompt_length: int) -> int | None:
    """How many tokens this ``generate`` call may add, as transformers resolves it (``None``: cannot be told).

    Follows ``GenerationMixin._prepare_generation_config`` and ``_prepare_generated_length`` (transformers 5.x):
    each setting is the keyword, else the ``generation_config`` passed, else ``model.generation_config``;
    ``max_new_tokens`` wins over ``max_length`` wherever either was set; ``max_length`` counts the prompt,
    except when no one set it, where its default (20) counts new tokens. An over-estimate only keeps scoring
    on; an under-estimate would switch eviction off, so where the length cannot be told exactly (a prompt given
    as ``inputs_embeds``, an unknown setting) the answer is ``None`` and the budget is enforced.
    """
    new = _generation_setting(model, kwargs, "max_new_tokens")
    if new is not None:
        return int(new)
    if kwargs.get("inputs_embeds") is not None:
        return None
    max_length = _generation_setting(model, kwargs, "max_length")
    if max_length is None:  # transformers' default: that many *new* tokens
        from transformers import GenerationConfig

        default = getattr(GenerationConfig, "_get_default_generation_params", dict)().get("max_length")
        return None if default is None else int(default)
    return max(int(max_length) - prompt_length, 0)


def prompt_of(args: tuple, kwargs: dict):
    """The prompt tensor handed to ``generate`` (positionally or by name), or ``None``."""
    for candidate in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs")):
        if isinstance(candidate, torch.Tensor):
            return candidate
    return None


def prompt_length(args: tuple, kwargs: dict) -> int | None:
    """Length of the prompt ``generate`` was given (``input_ids`` or ``inputs_embeds``), if any."""
    prompt = prompt_of(args, kwargs)
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    return int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None


def check_generate_kwargs(model, kwargs: dict, args: tuple = ()) -> None:
    """Refuse generation settings the evicting cache cannot honour, before any work."""
    check_generation_config(kwargs, where="")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if config is not None:
        # Settings given as keywords override the config's; check what the config adds beyond them.
        overridden = {name for name in ("cache_implementation", "use_cache", *ASSISTED_SETTINGS) if name in kwargs}
        check_generation_config(
            {name: getattr(config, name, None) for name in ("cache_implementation", "use_cache", *ASSISTED_SETTINGS)
             if name not in overridden},
            where="generation_config.",
        )
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, EvictingCache):
        raise PolicyError(
            f"a {type(cache).__name__} was passed to a patched model's generate; pass handle.new_cache() "
            "or no cache at all"
        )
    prompt = prompt_of(args, kwargs)
    if prompt is not None and prompt.dim() >= 2 and prompt.shape[1] == 0:
        raise PolicyError(
            "an empty prompt (input_ids of shape "
            f"{tuple(prompt.shape)}): the model cannot attend to nothing; give at least one token (e.g. BOS)"
        )
