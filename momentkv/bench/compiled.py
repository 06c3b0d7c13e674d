"""Benchmark entries that decode with a compiled forward: ``momentkv bench --compiled moment.yaml``.

A :class:`Compiled` entry patches the model with its policy and sets ``model.forward`` to a compiled forward
for the run, which a patched ``generate`` takes once every budget is full (the prompt and the growing cache run
eagerly; see :mod:`momentkv.engine.compiled_decode`). One compiled forward serves every run of a model in the
process (:func:`compiled_forward`), so its graphs are compiled once: :func:`warm_up` runs one untimed
generation per entry first and reports the compilation's wall time apart (:class:`CompileReport`); the timed
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
    """What the warm-up of one compiled entry cost: ``seconds`` inside dynamo and inductor (its compile-time
    metrics), ``wall`` of the whole warm-up generation, ``graphs`` compiled so far in the process."""

    name: str
    seconds: float
    wall: float
    graphs: int


def compiled_forward(model):
    """The one ``torch.compile``d forward of ``model`` in this process (made on first use)."""
    forward = _FORWARDS.get(model)
    if forward is None:
        forward = _FORWARDS[model] = torch.compile(type(model).forward.__get__(model), backend=BACKEND)
    return forward


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(entry: Compiled, generate) -> CompileReport:
    """One untimed generation under ``entry``, long enough to pass the budget by a few steps (two steady steps
    compile: the second makes the step counters symbolic); ``generate(new_tokens)`` runs it."""
    before = _compile_seconds()
    start = time.perf_counter()
    generate(_budget(entry.policy) + 8)
    wall = time.perf_counter() - start
    return CompileReport(entry.name, _compile_seconds() - before, wall, graphs_compiled())


def _budget(policy) -> int:
    """The policy's decode budget (a compiled entry's policy has a fixed one: ``generate`` refuses others)."""
    budget = getattr(policy.decode, "budget", None) if policy.decode is not None else None
    return budget if isinstance(budget, int) else 1
