"""A compiled decode step under a patch: compiled once every layer's shapes are fixed, eager before.

While the decoding cache grows, every step has new shapes, and a compiled forward would be compiled again and
again. Once every layer holds its full budget, a step writes the new token into an evicted slot: keys, values,
positions and scorer states keep their shapes, and the whole step (the model, the cache's update, the single
pass, the scoring and the choice of the next victim) traces into one graph without a break.

A patched ``generate`` therefore routes each forward (:class:`RoutedForward`): the prompt and the growing phase
run the model's own forward, eagerly; single-token steps of a cache whose layers are all at a fixed shape
(:meth:`~momentkv.engine.cache.EvictingCache.fixed_shape`) run the compiled one. The compiled forward is what
the user gave:

- ``model.forward = torch.compile(model.forward, ...)`` (before or after ``patch``);
- ``model.generate(..., compile_config=CompileConfig(...))``: transformers' own compiled call (on the CPU only
  when transformers compiles there at all), made eager where it would meet a growing cache.

Dynamo compiles the steady step twice, then never again for the same cache shapes: the first compiled step
specialises on the step counters (tokens seen, the newest position), the second finds them changed and makes
them symbolic ("automatic dynamic"), which every later step reuses. With ``dynamic=False`` that second
compilation cannot make them symbolic and every step would compile again; :func:`check_compile_options`
refuses it.

A policy some layer of which never reaches a fixed shape (no budget, a ratio budget, ``cadence`` above 1, a
sliding window) is refused with a :class:`~momentkv.PolicyError` (:func:`fixed_shape_problems`).
"""

from __future__ import annotations

import inspect
from typing import Callable

from momentkv.core.plan import LayerPlan
from momentkv.engine.cache import EvictingCache
from momentkv.errors import PolicyError


def compiled_forward(model) -> Callable | None:
    """``model.forward`` when the user replaced it by a ``torch.compile``d function, else ``None``."""
    forward = model.__dict__.get("forward")
    if isinstance(forward, RoutedForward):
        return forward.compiled
    return forward if hasattr(forward, "_torchdynamo_orig_callable") else None


def compile_config(model, kwargs: dict):
    """The ``compile_config`` this ``generate`` call runs with (keyword, ``generation_config``, the model's)."""
    if kwargs.get("compile_config") is not None:
        return kwargs["compile_config"]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, "compile_config", None) if config is not None else None
        if value is not None:
            return value
    return None


def fixed_shape_problems(plans: list[LayerPlan]) -> list[str]:
    """Why some layer's cache never stops changing shape at decode time (empty: every layer reaches one)."""
    problems = []
    for plan in plans:
        where = f"layer {plan.layer_idx}"
        if plan.budget is None:
            problems.append(f"{where} keeps every generated token (no decode budget, or an uncompressed layer): "
                            "its cache grows every step")
        elif not isinstance(plan.budget, int):
            problems.append(f"{where} has a ratio budget, which grows with the output")
        elif plan.cadence != 1:
            problems.append(f"{where} evicts every {plan.cadence} steps (cadence), so its cache grows between")
        elif plan.sliding_window is not None:
            problems.append(f"{where} is a sliding-window layer, whose stored length follows the window")
    return problems


def check_compilable(plans: list[LayerPlan], policy_name: str) -> None:
    """Raise :class:`~momentkv.PolicyError` when the policy cannot give a compiled step fixed shapes."""
    problems = fixed_shape_problems(plans)
    if problems:
        shown = problems[:3] + ([f"... and {len(problems) - 3} more layers"] if len(problems) > 3 else [])
        raise PolicyError(
            [f"{policy_name}: a compiled decode step needs every layer to reach a fixed shape once its budget is "
             f"full, but {p}; run this policy without torch.compile (momentkv's eager path), or use a policy "
             "with a fixed integer budget, cadence 1 and no sliding layers" for p in shown]
        )


def check_compile_options(options: dict) -> None:
    """Refuse ``torch.compile`` options under which the steady step would compile again at every step."""
    if options.get("dynamic") is False:
        raise PolicyError(
            "torch.compile(..., dynamic=False) under momentkv: the step counters (tokens seen, the newest "
            "position) change every step, and without dynamic integers every step would compile anew; leave "
            "dynamic unset (None), so that dynamo makes them symbolic after the first steady step"
        )


def compile_options(compiled: Callable | None) -> dict:
    """``{"dynamic": ...}`` as a ``torch.compile``d function was made with, read from the ``OptimizeContext``
    its wrapper closes over (a private detail: where it is not found, nothing is said and nothing refused)."""
    try:
        context = inspect.getclosurevars(compiled).nonlocals.get("self")
    except (TypeError, ValueError):
        return {}
    dynamic = getattr(context, "_dynamic", None)
    return {} if dynamic is None else {"dynamic": dynamic}


class RoutedForward:
    """``model.forward`` during a patched ``generate``: ``compiled`` for single-token steps of a cache whose
    layers all have fixed shapes, ``eager`` (the model's own forward) for every other call."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager = compiled, eager
        self.compiled_calls = 0

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if isinstance(cache, EvictingCache) and tokens is not None and tokens.shape[1] == 1 and cache.fixed_shape():
            self.compiled_calls += 1
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)
