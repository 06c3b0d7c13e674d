"""Benchmark entries that decode with a compiled forward: ``momentkv bench --compiled moment.yaml``.

A :class:`Compiled` entry patches the model with its policy and sets ``model.forward`` to a compiled forward
for the run, which a patched ``generate`` takes once every budget is full (the prompt and the growing cache run
eagerly; see :mod:`momentkv.engine.compiled_decode`). One compiled forward serves every run of a model in the
process (:func:`compiled_forward`), so its graphs are compiled once: :func:`warm_up` runs one untimed
generation per entry first and reports the wall time of the steps that compiled apart (:class:`CompileReport`); the timed
runs then compile nothing (checked: the number of graphs after them is reported with it).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
SUFFIX = "+compiled"
BACKEND = "inductor"  # torch.compile's default; tests use dynamo alone ("eager")


@dataclass(frozen=True)
class Compiled:
    """``policy`` (a :class:`~momentkv.Policy`) decoded with a compiled forward."""

    policy: object

    @property
    def name(self) -> str:
        return f"{self.policy.name}{SUFFIX}"


@dataclass
class CompileReport:
    """What the warm-up of one compiled entry cost: ``seconds``, the wall time of the compiled calls during which
    dynamo compiled a graph (compilation and that call's step), ``wall`` of the whole warm-up generation,
    ``graphs`` compiled so far in the process."""

    name: str
    seconds: float
    wall: float
    graphs: int


class _CompileTimer:
    """A compiled forward that adds up the wall time of the calls that compiled a graph."""

    def __init__(self, compiled):
        self.compiled = compiled
        self._torchdynamo_orig_callable = compiled._torchdynamo_orig_callable  # what momentkv routes eager steps to
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        before, began = graphs_compiled(), time.perf_counter()
        out = self.compiled(*args, **kwargs)
        if graphs_compiled() != before:
            self.seconds += time.perf_counter() - began
        return out


def compiled_forward(model) -> _CompileTimer:
    """The one ``torch.compile``d forward of ``model`` in this process (made on first use)."""
    forward = _FORWARDS.get(model)
    if forward is None:
        compiled = torch.compile(type(model).forward.__get__(model), backend=BACKEND)
        forward = _FORWARDS[model] = _CompileTimer(compiled)
    return forward


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(entry: Compiled, model, generate) -> CompileReport:
    """One untimed generation under ``entry``, long enough to pass the budget by a few steps (two steady steps
    compile: the second makes the step counters symbolic); ``generate(new_tokens)`` runs it."""
    timer = compiled_forward(model)
    before, start = timer.seconds, time.perf_counter()
    generate(_budget(entry.policy) + 8)
    wall = time.perf_counter() - start
    return CompileReport(entry.name, timer.seconds - before, wall, graphs_compiled())


def _budget(policy) -> int:
    """The policy's decode budget (a compiled entry's policy has a fixed one: ``generate`` refuses others)."""
    budget = getattr(policy.decode, "budget", None) if policy.decode is not None else None
    return budget if isinstance(budget, int) else 1
