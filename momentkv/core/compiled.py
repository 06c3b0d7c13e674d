"""``torch.compile`` of a plain-tensor step function, once per static shape, with an eager fallback.

:class:`CompiledStep` wraps a function of tensors (the fused scoring step of
:mod:`~momentkv.core.fused_scoring`). Called with tensors of a shape it has not met, it compiles the function
for that shape (``dynamic=False``, ``fullgraph=True``: inductor's C++ code generation on the CPU, Triton on
CUDA), times the first call and records it in :func:`compile_times`; later calls of that shape run the compiled
code. It falls back to the eager function

- inside a region that is itself being compiled (a compiled decode step traces the eager function into its
  own graph);
- beyond :data:`MAX_SHAPES` shapes (each is one more compilation, and dynamo's cache per function is bounded);
- for good, with one warning, when compilation fails (no C++ compiler, an unsupported backend): the first
  failing call runs eagerly and nothing has been modified by the attempt (compilation happens before the
  compiled code first runs).

Whether a layer compiles at all is :func:`enabled` (``MOMENTKV_COMPILE_SCORING``, read once at import).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Callable

import torch

ENV = "MOMENTKV_COMPILE_SCORING"
MAX_SHAPES = 8
_SETTING = os.environ.get(ENV, "auto").strip().lower()
_lock = threading.Lock()
_failed: list[str] = []  # the reason compilation was given up, once
_times: dict[tuple, float] = {}  # (function name, shape key) -> seconds of the first (compiling) call


def enabled(device: torch.device | str) -> bool:
    """Whether steady-state scoring is compiled on ``device``.

    ``MOMENTKV_COMPILE_SCORING=1`` compiles on every device, ``0`` on none; ``auto`` (the default) compiles
    only where it measured faster than the eager step. On this project's CPU it measured slower inside a
    generation (docs/performance.md: each call pays dynamo's guards and wrapper, about as much as the dozen
    operations it replaces), and it has not been measured on CUDA, so ``auto`` compiles nowhere for now. On
    the CPU the step runs natively by default (:mod:`~momentkv.core.native_scoring`); setting this to ``1``
    takes precedence over that.
    """
    if _failed or _SETTING in ("0", "false", "off", "no", "auto"):
        return False
    return _SETTING in ("1", "true", "on", "yes")


def compile_times() -> dict[tuple, float]:
    """Seconds each compilation took (its first call, compile and run), by (function name, shape key)."""
    return dict(_times)


def _shape_key(args) -> tuple:
    key = []
    for arg in args:
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for item in items:
            if isinstance(item, torch.Tensor):
                key.append((tuple(item.shape), item.dtype, item.device.type))
            else:
                key.append(item)
    return tuple(key)


class CompiledStep:
    """``fn`` compiled once per input shape (see the module docstring)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self._compiled: Callable | None = None
        self._shapes: set[tuple] = set()

    def __call__(self, *args):
        if _failed or torch.compiler.is_compiling():
            return self.fn(*args)
        key = _shape_key(args)
        if key not in self._shapes:
            if len(self._shapes) >= MAX_SHAPES:
                return self.fn(*args)
            return self._first_call(key, args)
        return self._compiled(*args)

    def _first_call(self, key: tuple, args):
        with _lock:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False, fullgraph=True)
            start = time.perf_counter()
            try:
                out = self._compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: eager from now on, said once
                _give_up(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
                return self.fn(*args)
            _times[(self.name, key)] = time.perf_counter() - start
            self._shapes.add(key)
            return out


def _give_up(reason: str) -> None:
    if not _failed:
        _failed.append(reason)
        warnings.warn(
            f"momentkv: compiling the scoring step failed ({reason}); scoring runs eagerly from now on "
            f"(same results, slower on the CPU). Set {ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
