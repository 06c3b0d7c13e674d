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

from momentkv.engine.attention import PREFIX, register_attention
from momentkv.engine.cache import EvictingCache
from momentkv.engine.plan import build_plans
from momentkv.errors import PolicyError
from momentkv.patches import SUPPORTED_MODEL_TYPES, adapter_for
from momentkv.policy.loader import PolicySource, load_policy

SUPPORTED_ATTENTION = ("sdpa", "eager")
UNSUPPORTED_CACHE_IMPLEMENTATIONS = ("static", "offloaded", "offloaded_static", "quantized", "sliding_window", "hybrid")
_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_kwarg_name() -> str:
    """The keyword ``generate`` takes a cache under (``cache`` from transformers 5.x's rename on)."""
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", None)
    return "cache" if names and "cache" in names else "past_key_values"


def _check_model(model):
    """Return the family adapter and base attention implementation, or raise ``PolicyError``."""
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
    cache_impl = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_impl in UNSUPPORTED_CACHE_IMPLEMENTATIONS:
        raise PolicyError(
            f"generation_config.cache_implementation={cache_impl!r} cannot evict tokens; momentkv brings its own "
            "dynamic cache: set it to None"
        )
    return adapter, implementation


class Handle:
    """What ``patch`` returns: the model's policy, a cache factory, stats, and ``remove()``.

    Also a context manager: ``with momentkv.patch(model, "moment.yaml"): ...`` removes the patch on exit.
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

    def new_cache(self) -> EvictingCache:
        """A fresh evicting cache for this model and policy (for manual forward loops, or ``generate(cache=...)``)."""
        self.last_cache = EvictingCache(self.plans, self.policy.name)
        return self.last_cache

    def stats(self) -> dict:
        """Stats of the most recent cache this handle created (see ``EvictingCache.stats``)."""
        if self.last_cache is None:
            return {"policy": self.policy.name, "layers": [], "seen": 0, "stored": 0, "evicted": 0,
                    "kv_bytes": 0, "state_bytes": 0, "batch_x_kv_heads": 0}
        return self.last_cache.stats()

    def _install(self) -> None:
        model = self.model
        model.set_attn_implementation(self.attention_name)
        original = type(model).generate.__get__(model)
        cache_kwarg = _cache_kwarg_name()

        @functools.wraps(original)
        def generate(*args, **kwargs):
            _check_generate_kwargs(model, kwargs)
            has_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
            if kwargs.get("use_cache", True) is not False and not has_cache:
                kwargs[cache_kwarg] = self.new_cache()
            return original(*args, **kwargs)

        model.generate = generate
        _HANDLES[model] = self
        self.active = True

    def remove(self) -> None:
        """Restore the model exactly as it was before ``patch``. Calling it again does nothing."""
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


def _check_generate_kwargs(model, kwargs: dict) -> None:
    """Refuse generation settings the evicting cache cannot honour, before any work."""
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
        raise PolicyError(
            "assisted decoding rolls the cache back after rejected drafts, which an evicting cache cannot do; "
            "momentkv supports greedy, sampling and beam search"
        )
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    impl = kwargs.get("cache_implementation") or getattr(config, "cache_implementation", None)
    if impl in UNSUPPORTED_CACHE_IMPLEMENTATIONS:
        raise PolicyError(f"cache_implementation={impl!r} cannot evict tokens; momentkv brings its own cache")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, EvictingCache):
        raise PolicyError(
            f"a {type(cache).__name__} was passed to a patched model's generate; pass handle.new_cache() "
            "or no cache at all"
        )


def patch(model, policy: PolicySource = "moment.yaml") -> Handle:
    """Hold ``model``'s decoding KV cache to ``policy``; return a :class:`Handle`.

    ``policy`` is a built-in name (``"moment.yaml"``), a path, a dict or a :class:`~momentkv.Policy`. Patching a
    patched model replaces its policy. Raises :class:`~momentkv.PolicyError` (the model untouched) for an
    invalid policy, an unsupported model family, attention implementation or cache implementation.
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
    handle._install()
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
    """``with patched(model, "h2o.yaml") as handle:`` patch for the block, restore on exit."""
    handle = patch(model, policy)
    try:
        yield handle
    finally:
        handle.remove()


def is_momentkv_implementation(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)
