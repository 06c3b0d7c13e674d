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


from momentkv.engine.attention import register_attention
from momentkv.engine.cache import EvictingCache
from momentkv.engine import compiled_decode
from momentkv.engine.checks import (
    SUPPORTED_ATTENTION, check_dtype, check_generate_kwargs, check_model, check_not_compiled, max_new_tokens,
    prompt_length,
)
from momentkv.engine.parallel import check_tensor_parallel
from momentkv.core.plan import build_plans
from momentkv.errors import PolicyError
from momentkv.policy.loader import PolicySource, load_policy

_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_kwarg_name() -> str:
    """The keyword ``generate`` takes a cache under (``cache`` from transformers 5.x's rename on)."""
    from transformers.generation import utils

    names = getattr(utils, "ALL_CACHE_NAMES", None)
    return "cache" if names and "cache" in names else "past_key_values"


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
        check_generate_kwargs(model, kwargs, args)
        self.check_compiled(handle, kwargs)
        handle.follow_attention_switch()
        check_dtype(model)
        length = prompt_length(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("use_cache", True) is not False and cache is None:
            cache = kwargs[self._cache_kwarg] = handle.new_cache()
        if isinstance(cache, EvictingCache) and length is not None:
            # Everything given is context (the prompt, or a conversation so far); then at most this many
            # generated tokens, which tells each layer whether its budget can be reached in this call.
            cache.expect(length, max_new_tokens(model, kwargs, length))
        compiled, config = compiled_decode.compiled_forward(model), compiled_decode.compile_config(model, kwargs)
        if compiled is None and config is None:
            return self._original(*args, **kwargs)
        if isinstance(cache, EvictingCache) and config is not None:
            cache.compile_decode = True
        with _routed(model, compiled, config):
            return self._original(*args, **kwargs)

    @staticmethod
    def check_compiled(handle: "Handle", kwargs: dict) -> None:
        """Refuse a compiled step this policy cannot give fixed shapes, before any work."""
        model = handle.model
        check_not_compiled(model)
        compiled, config = compiled_decode.compiled_forward(model), compiled_decode.compile_config(model, kwargs)
        if compiled is None and config is None:
            return
        compiled_decode.check_compilable(handle.plans, handle.policy.name)
        options = compiled_decode.compile_options(compiled) if compiled is not None else {}
        if config is not None:
            options.setdefault("dynamic", getattr(config, "dynamic", None))
        compiled_decode.check_compile_options(options)

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


@contextlib.contextmanager
def _routed(model, compiled, config):
    """For one ``generate`` call, route the forward calls of a compiled ``forward`` (and transformers' compiled
    call of a ``compile_config``) to eager until the cache's shapes are fixed (see ``compiled_decode``)."""
    own = model.__dict__.get("forward")
    if compiled is not None:
        model.forward = compiled_decode.RoutedForward(compiled, compiled._torchdynamo_orig_callable)
    if config is not None:
        original = type(model).get_compiled_call.__get__(model)
        model.get_compiled_call = lambda cfg: compiled_decode.RoutedForward(original(cfg), model.__call__)
    try:
        yield
    finally:
        model.__dict__.pop("get_compiled_call", None)
        if compiled is not None:
            model.forward = own


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

    def follow_attention_switch(self) -> None:
        """Follow a ``model.set_attn_implementation(...)`` made after ``patch()``.

        A switch to another supported implementation (``sdpa`` <-> ``eager``) is followed: momentkv's function
        for it takes over, and ``remove()`` restores that implementation. A switch to anything else raises
        ``PolicyError`` before any work (momentkv would otherwise be bypassed without a word).
        """
        model = self.model
        if not self.active or model is None:
            return
        current = model.config._attn_implementation
        if current == self.attention_name:
            return
        if current not in SUPPORTED_ATTENTION:
            raise PolicyError(
                f"the model's attention implementation was switched to {current!r} after momentkv.patch(): "
                f"momentkv supports {', '.join(SUPPORTED_ATTENTION)}; call model.set_attn_implementation('sdpa') "
                "(or 'eager'), or handle.remove() to run the model without momentkv"
            )
        self.attention_name = register_attention(current, self.adapter.model_type, self.adapter.eager_attention())
        self.base_implementation = current
        model.set_attn_implementation(self.attention_name)

    def new_cache(self, prompt_length: int | None = None) -> EvictingCache:
        """A fresh evicting cache for this model and policy (for manual forward loops, or ``generate(cache=...)``).

        ``prompt_length`` marks exactly that many first tokens as the prompt, however they are fed; without
        it, every multi-token forward is context (the prompt, or a later user turn) and every single-token
        forward after it is generated.
        """
        model = self.model
        if model is not None:
            self.follow_attention_switch()
            check_dtype(model)  # the model may have been converted since patch()
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
    current = handle_of(model)
    adapter, base_implementation = check_model(model, current.base_implementation if current else None)
    check_tensor_parallel(model, resolved)
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
    """The active handle of ``model``, or ``None`` (also for anything that is not a model)."""
    try:
        return _HANDLES.get(model)
    except TypeError:  # not weak-referenceable: certainly not a patched model
        return None


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
