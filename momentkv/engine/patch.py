"""``patch``/``unpatch``: switch one model instance to momentkv's attention and evicting cache, and back.

Nothing is patched at import and no class is modified: ``patch`` registers an attention function with
transformers' ``AttentionInterface`` (and its mask function), switches *this instance* to it with
``set_attn_implementation``, and gives *this instance* a ``generate`` that creates a fresh evicting cache
when the caller passes none. Everything is validated before the first change, so a failed ``patch``
leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from momentkv.engine.attention import register_attention
from momentkv.engine.cache import EvictingCache
from momentkv.engine.plan import build_plans
from momentkv.errors import PolicyError
from momentkv.patches import SUPPORTED_MODEL_TYPES, adapter_for
from momentkv.policy.loader import PolicySource, load_policy

SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Attributes of each layer's attention module that the engine and the attention functions read.
ATTENTION_ATTRIBUTES = ("layer_idx", "scaling", "num_key_value_groups")
# generate() settings that switch to assisted decoding, which crops the cache after rejected drafts.
ASSISTED_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_kwarg_name() -> str:
    """The keyword ``generate`` takes a cache under (``cache`` from transformers 5.x's rename on)."""
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", None)
    return "cache" if names and "cache" in names else "past_key_values"


def _compiled_part(model) -> str | None:
    """How ``model`` was ``torch.compile``d (a wrapper, ``.compile()``, a compiled ``forward``), or ``None``."""
    if getattr(model, "_orig_mod", None) is not None:
        return f"a torch.compile wrapper ({type(model).__name__})"
    modules = model.modules() if isinstance(model, torch.nn.Module) else [model]
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is not None:
            return f"a module compiled in place ({type(module).__name__}.compile())"
        if hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"):
            return f"a compiled forward ({type(module).__name__}.forward = torch.compile(...))"
    return None


def _check_not_compiled(model) -> None:
    compiled = _compiled_part(model)
    if compiled is not None:
        raise PolicyError(
            f"the model is {compiled}: momentkv's cache changes shape every step, which a compiled graph cannot "
            "follow, and a wrapper would leave the model underneath unpatched; momentkv supports eager models: "
            "patch the uncompiled model (for a wrapper, momentkv.patch(compiled._orig_mod))"
        )


def _check_dtype(model) -> None:
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


def _check_attention_modules(model, text_config) -> None:
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


def _check_generation_config(config, where: str = "generation_config.") -> None:
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


def _check_model(model):
    """Return the family adapter and base attention implementation, or raise ``PolicyError``.

    Checked in order: not a compiled model, a supported family, a supported attention implementation, the
    parameters' dtype, the attention modules' structure, and the model's generation config.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise PolicyError(
            f"expected a transformers model (a torch.nn.Module with a config), got {type(model).__name__}: pass the "
            "model returned by AutoModelForCausalLM.from_pretrained (or momentkv.models.load)"
        )
    _check_not_compiled(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = adapter_for(model_type) if model_type else None
    if adapter is None:
        raise PolicyError(
            f"unsupported model type {model_type!r}: momentkv supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    handle = _HANDLES.get(model)
    implementation = handle.base_implementation if handle is not None else config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise PolicyError(
            f"unsupported attention implementation {implementation!r}: momentkv needs the attention weights it "
            f"scores with, and supports {', '.join(SUPPORTED_ATTENTION)}; load the model with "
            "attn_implementation='sdpa' or call model.set_attn_implementation('sdpa') first"
        )
    if not callable(getattr(type(model), "generate", None)):
        raise PolicyError(
            f"{type(model).__name__} is a base model without a language-model head (it has no generate): patch the "
            f"causal LM that holds it (e.g. {model_type.capitalize()}ForCausalLM), whose generate() momentkv wraps"
        )
    _check_dtype(model)
    _check_attention_modules(model, config.get_text_config(decoder=True))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        _check_generation_config(generation_config)
    return adapter, implementation


class PatchedGenerate:
    """The ``generate`` a patched model carries: the model's own, with a fresh evicting cache per call.

    An object rather than a closure, so that ``copy.deepcopy`` of a patched model gives a copy patched with
    the same policy on its *own* weights (a closure would keep calling the original model).
    """

    def __init__(self, handle: "Handle"):
        self._handle = handle
        model = handle.model
        self._original = type(model).generate.__get__(model)
        self._cache_kwarg = _cache_kwarg_name()
        functools.update_wrapper(self, self._original)

    def __call__(self, *args, **kwargs):
        handle = self._handle
        model = handle.model
        _check_generate_kwargs(model, kwargs, args)
        _check_dtype(model)
        prompt_length = _prompt_length(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("use_cache", True) is not False and cache is None:
            cache = kwargs[self._cache_kwarg] = handle.new_cache()
            if prompt_length is not None:
                cache.expect(prompt_length, _max_new_tokens(model, kwargs, prompt_length))
        elif isinstance(cache, EvictingCache) and prompt_length is not None:
            cache.expect(prompt_length)  # a conversation continued: everything given is context
        return self._original(*args, **kwargs)

    def __deepcopy__(self, memo):
        handle = self._handle
        copied = memo.get(id(handle.model))
        if copied is None:  # the generate function alone was copied: it stays the model's
            return self
        twin = handle._twin(copied)
        _HANDLES[copied] = twin
        return PatchedGenerate(twin)

    def __reduce__(self):
        raise PolicyError(
            "a patched model cannot be pickled (its generate is momentkv's); call handle.remove() or "
            "momentkv.unpatch(model) first, and patch again after loading"
        )


def _max_new_tokens(model, kwargs: dict, prompt_length: int) -> int | None:
    """How many tokens this ``generate`` call may add (``None`` when it cannot be told)."""
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    max_length = kwargs.get("max_length")
    if max_length is None and config is not None:
        if getattr(config, "max_new_tokens", None) is not None:
            return int(config.max_new_tokens)
        max_length = getattr(config, "max_length", None)
    return None if max_length is None else max(int(max_length) - prompt_length, 0)


class Handle:
    """What ``patch`` returns: the model's policy, a cache factory, stats, and ``remove()``.

    Also a context manager: ``with momentkv.patch(model, "moment.yaml"): ...`` removes the patch on exit.
    A model carries at most one active handle: patching it again replaces this one (``active`` turns False).
    ``remove()`` is idempotent: a second call, or a call on a replaced handle, changes nothing.
    """

    def __init__(self, model, policy, adapter, base_implementation: str):
        self.policy = policy
        self.adapter = adapter
        self.base_implementation = base_implementation
        self._model_ref = weakref.ref(model)
        config = model.config.get_text_config(decoder=True)
        self.plans = build_plans(policy, config.num_hidden_layers, adapter.sliding_windows(config))
        self.attention_name = register_attention(base_implementation, adapter.model_type, adapter.eager_attention())
        self.last_cache: EvictingCache | None = None
        self.active = False

    @property
    def model(self):
        return self._model_ref()

    def _twin(self, model) -> "Handle":
        """An active handle of the same policy for ``model``, a deep copy of this handle's model (whose
        attributes may still be in the making: nothing is read from it)."""
        twin = object.__new__(Handle)
        twin.__dict__.update(self.__dict__)
        twin._model_ref = weakref.ref(model)
        twin.last_cache = None
        twin.active = True
        return twin

    def new_cache(self, prompt_length: int | None = None) -> EvictingCache:
        """A fresh evicting cache for this model and policy (for manual forward loops, or ``generate(cache=...)``).

        ``prompt_length`` marks exactly that many first tokens as the prompt, however they are fed; without
        it, every multi-token forward is context (the prompt, or a later user turn) and every single-token
        forward after it is generated.
        """
        model = self.model
        if model is not None:
            _check_dtype(model)  # the model may have been converted since patch()
        self.last_cache = EvictingCache(self.plans, self.policy.name, prompt_length)
        return self.last_cache

    def stats(self) -> dict:
        """Stats of the most recent cache this handle created (see ``EvictingCache.stats``)."""
        if self.last_cache is None:
            return {"policy": self.policy.name, "layers": [], "seen": 0, "stored": 0, "evicted": 0,
                    "kv_bytes": 0, "state_bytes": 0, "batch_x_kv_heads": 0}
        return self.last_cache.stats()

    def _install(self) -> None:
        model = self.model
        generate = PatchedGenerate(self)  # the model's own generate is looked up before any change
        try:
            model.set_attn_implementation(self.attention_name)
            model.generate = generate
        except BaseException:
            model.__dict__.pop("generate", None)
            model.set_attn_implementation(self.base_implementation)
            raise
        _HANDLES[model] = self
        self.active = True

    def remove(self) -> None:
        """Restore the model exactly as it was before ``patch``.

        Calling it again, or on a handle a later ``patch`` replaced, does nothing (the replacing handle stays).
        """
        model = self.model
        if not self.active or model is None:
            return
        self.active = False
        if _HANDLES.get(model) is self:
            del _HANDLES[model]
        model.__dict__.pop("generate", None)
        model.set_attn_implementation(self.base_implementation)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<momentkv.Handle policy={self.policy.name!r} {state}>"


def _prompt_of(args: tuple, kwargs: dict):
    """The prompt tensor handed to ``generate`` (positionally or by name), or ``None``."""
    for candidate in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs")):
        if isinstance(candidate, torch.Tensor):
            return candidate
    return None


def _prompt_length(args: tuple, kwargs: dict) -> int | None:
    """Length of the prompt ``generate`` was given (``input_ids`` or ``inputs_embeds``), if any."""
    prompt = _prompt_of(args, kwargs)
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    return int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None


def _check_generate_kwargs(model, kwargs: dict, args: tuple = ()) -> None:
    """Refuse generation settings the evicting cache cannot honour, before any work."""
    _check_generation_config(kwargs, where="")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if config is not None:
        # Settings given as keywords override the config's; check what the config adds beyond them.
        overridden = {name for name in ("cache_implementation", "use_cache", *ASSISTED_SETTINGS) if name in kwargs}
        _check_generation_config(
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
    prompt = _prompt_of(args, kwargs)
    if prompt is not None and prompt.dim() >= 2 and prompt.shape[1] == 0:
        raise PolicyError(
            "an empty prompt (input_ids of shape "
            f"{tuple(prompt.shape)}): the model cannot attend to nothing; give at least one token (e.g. BOS)"
        )


def patch(model, policy: PolicySource = "moment.yaml") -> Handle:
    """Hold ``model``'s decoding KV cache to ``policy``; return a :class:`Handle`.

    ``policy`` is a built-in name (``"moment.yaml"``), a path, a dict or a :class:`~momentkv.Policy`.

    Everything is validated before anything changes: the policy, the model family, the attention
    implementation, the parameters' dtype (float32, float16, bfloat16), the attention modules' structure,
    that the model is not ``torch.compile``d, and the generation settings in ``model.generation_config``
    (no ``cache_implementation``, no assisted decoding, ``use_cache`` not False). Any failure raises
    :class:`~momentkv.PolicyError` and leaves the model exactly as it was (a patched model keeps its patch).

    Patching a patched model *replaces* its policy: the old handle becomes inactive (its ``remove()`` then does
    nothing) and the new handle's ``remove()`` restores the model as it was before the first ``patch``.
    """
    resolved = load_policy(policy)
    adapter, base_implementation = _check_model(model)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    problems = resolved.problems_for_model(num_layers)
    if problems:
        raise PolicyError([f"{resolved.name}: {p}" for p in problems])
    handle = Handle(model, resolved, adapter, base_implementation)
    previous = _HANDLES.get(model)
    if previous is not None:
        previous.remove()
    try:
        handle._install()
    except BaseException:
        if previous is not None:
            previous._install()
        raise
    return handle


def unpatch(model) -> None:
    """Remove momentkv from ``model`` (no-op if it is not patched)."""
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.remove()


def handle_of(model) -> Handle | None:
    """The active handle of ``model``, or ``None``."""
    return _HANDLES.get(model)


@contextlib.contextmanager
def patched(model, policy: PolicySource = "moment.yaml"):
    """``with patched(model, "h2o.yaml") as handle:`` patch for the block, restore on exit.

    Nested inside another patch, the block's policy replaces the outer one and the outer patch is back on exit.
    """
    outer = _HANDLES.get(model)
    handle = patch(model, policy)
    try:
        yield handle
    finally:
        if handle.active:
            handle.remove()
            if outer is not None and outer.model is model:
                outer._install()
