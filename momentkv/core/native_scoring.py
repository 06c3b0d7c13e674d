"""The steady-state scoring step of one layer as one native call on the CPU (``native_scoring.cpp``).

Eagerly, :class:`~momentkv.core.fused_scoring.FusedStep` is about a dozen small tensor operations per layer and
step (fold, bias correction, two ranks, their sum, protections, victim), each one dispatch of a few
microseconds on tensors of a few hundred elements. On the CPU the same arithmetic runs here as one C++ function
over the rows ``(batch * kv_heads)``, called through :mod:`ctypes`: one call per layer and step.

The shared library is built on first use with the system's C++ compiler (``$CXX``, else ``c++``/``g++``),
once per source, compiler and machine, into ``$MOMENTKV_CACHE_DIR`` (default ``~/.cache/momentkv``) under a name
holding their hash, and loaded from there afterwards (a build takes well under a second). Where it cannot be
built or loaded (no compiler, a read-only cache), :func:`native_step` warns once and returns ``None``, and
scoring stays on the eager step: the same results up to rounding.

Rounding: the fold, recency, the ranks, ``max``, the mean correction and the weighted sums are the float32
operations torch performs, in its order (built without contraction into fused multiply-adds), so they are equal
bit for bit; the decayed bias correction (``expm1f``, and no fused multiply-add where ATen uses one) and the
sums of ``sum`` and ``zscore`` may round differently (the tests bound them). ``MOMENTKV_NATIVE_SCORING=0``
turns the native step off.
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path

import torch

from momentkv.core import native_build

ENV = native_build.SWITCH
_KINDS = {"ema": 0, "accumulated": 1, "instantaneous": 2, "recency": 3}
_NORMS = {"none": 0, "sum": 1, "max": 2, "zscore": 3, "rank": 4}
_CPU = native_build.cpu_features()
# Vectorised for this CPU only where its features key the build (as paged_probs); never contracted into fused
# multiply-adds, never reassociated (no reduction without an explicit order), so the arithmetic stays torch's.
_FLAGS = ("-O3", *(("-march=native",) if _CPU else ()), "-fopenmp", "-shared", "-fPIC", "-std=c++17",
          "-ffp-contract=off", "-fno-fast-math")


def _library() -> native_build.NativeFunction:
    return native_build.NativeFunction(
        "native_scoring.cpp", "momentkv_fused_scoring_call", _FLAGS, "the native scoring step",
        "scoring runs as tensor operations (same results up to rounding, slower)", key_extra=_CPU)


LIBRARY = _library()


def enabled() -> bool:
    """Whether the native step is wanted (``MOMENTKV_NATIVE_SCORING``, read at import; on unless ``0``)."""
    return native_build.enabled()


def failure() -> str | None:
    """Why the library could not be built or loaded, or ``None``."""
    return LIBRARY.failure()


def _compiler() -> list[str] | None:
    return native_build.compiler()


def _build(rebuild: bool = False) -> Path:
    """The shared library for this source (as read at import), compiler and machine: the cached one, or a new
    build."""
    return native_build.build("native_scoring.cpp", _FLAGS, _compiler(), rebuild, key_extra=LIBRARY.key_extra,
                              source=LIBRARY.source)


def _function():
    """The loaded C function, or ``None`` (warned once) where it cannot be built."""
    return LIBRARY.get(_build)


def _correction(part) -> int:
    """0: none; 1: the mean (alpha = 1, decided on the double, as the tensor step decides); 2: decayed."""
    kind, alpha, corrected = part[:3]
    if kind != "ema" or not corrected:
        return 0
    return 1 if alpha == 1.0 else 2


class NativeStep:
    """A :class:`~momentkv.core.fused_scoring.FusedSpec`'s step through the native function.

    Call it as ``FusedStep`` is called (``states, attention, positions, now, prompt_tokens``; ``now`` and
    ``prompt_tokens`` ints, or ``(batch, 1, 1)`` int64 tensors of one value per batch row); it returns ``(total, victim)`` of the same shapes, or ``None`` when these
    tensors are not ones it takes (not contiguous CPU tensors of the shapes and dtypes the step reads): the
    caller then runs the eager step.
    """

    def __init__(self, spec, fn):
        self.spec, self._fn = spec, fn
        n, stateful = len(spec.parts), len(spec.stateful)
        self._constants = (
            (ctypes.c_int32 * n)(*(_KINDS[p[0]] for p in spec.parts)),
            (ctypes.c_float * n)(*(p[1] for p in spec.parts)),
            (ctypes.c_float * n)(*(math.log(p[1]) for p in spec.parts)),
            (ctypes.c_int32 * n)(*(_correction(p) for p in spec.parts)),
            (ctypes.c_int32 * n)(*(_NORMS[p[3]] for p in spec.parts)),
            (ctypes.c_float * n)(*(p[4] for p in spec.parts)),
        )
        self._state_addresses = (ctypes.c_int64 * max(stateful, 1))()
        # The argument block (see native_scoring.cpp): constants written once, the rest at every call. One block per
        # step object, shared by every layer whose spec is equal: calls fill and read it under self._lock.
        self._block = (ctypes.c_int64 * 28)()
        self._block[2] = n
        for i, array in enumerate(self._constants, start=3):
            self._block[i] = ctypes.addressof(array)
        self._block[9] = ctypes.addressof(self._state_addresses)
        self._block[14], self._block[15] = spec.sinks, spec.recent
        self._lock = threading.Lock()

    @staticmethod
    def _takes(tensor: torch.Tensor, dtype: torch.dtype, shape) -> bool:
        """A CPU tensor of ``shape`` whose rows are contiguous (any strides over batch and heads, 0 included)."""
        return (tensor.layout == torch.strided and tensor.dtype == dtype and tensor.shape == shape
                and tensor.device.type == "cpu" and (tensor.stride(-1) == 1 or shape[-1] <= 1))

    @staticmethod
    def _owned(tensor: torch.Tensor, shape) -> bool:
        """A state: contiguous float32 CPU ``shape`` (written in place, so no broadcast rows)."""
        return (tensor.layout == torch.strided and tensor.dtype == torch.float32 and tensor.shape == shape
                and tensor.device.type == "cpu" and tensor.is_contiguous())

    @staticmethod
    def _per_row(value, batch: int) -> tuple[int, torch.Tensor | None]:
        """``(scalar, None)`` for an int (or a one-element tensor), ``(0, (batch,) int64)`` for one value per batch
        row (a ``(batch, 1, 1)`` tensor, as a paged engine's rows stand at different steps)."""
        if not isinstance(value, torch.Tensor):
            return int(value), None
        if value.numel() == 1:
            return int(value), None
        if value.numel() != batch or value.device.type != "cpu":
            raise ValueError(f"momentkv: {tuple(value.shape)} values for a batch of {batch} rows")
        return 0, value.reshape(batch).to(torch.int64).contiguous()

    def __call__(self, states, attention, positions, now, prompt_tokens):
        shape = positions.shape
        if (len(shape) != 3 or shape[-1] == 0 or not self._takes(positions, torch.int64, shape)
                or len(states) != len(self.spec.stateful) or not all(self._owned(s, shape) for s in states)):
            return None
        if not self._attention_taken(attention, shape):
            return None
        total = torch.empty(shape, dtype=torch.float32)
        victim = self._run(states, attention, positions, now, prompt_tokens, total, tuple(shape), None)
        return None if victim is None else (total, victim)

    def paged(self, pools, total, positions, index, attention, now, prompt_tokens):
        """The step on per-slot pools, in place: ``pools`` (one per stateful part), ``total`` float32 and
        ``positions`` int64 ``(num_slots, kv_heads)`` contiguous, row ``(b, h)``'s slot ``i`` at flat cell
        ``index[b, h, i]`` of each (``index`` ``(batch, kv_heads, T)`` int64, distinct cells). The states are folded
        there, the total written there; returns the victims ``(batch, kv_heads, 1)``, or ``None`` with nothing
        changed where these tensors are not ones it takes."""
        shape = index.shape
        cells = positions.numel()
        if (len(shape) != 3 or shape[-1] == 0 or index.dtype != torch.int64 or not index.is_contiguous()
                or index.device.type != "cpu" or len(pools) != len(self.spec.stateful)
                or not all(self._owned(p, positions.shape) for p in (*pools, total))
                or positions.dtype != torch.int64 or not positions.is_contiguous()
                or positions.device.type != "cpu" or not self._attention_taken(attention, shape)):
            return None
        return self._run(pools, attention, positions, now, prompt_tokens, total, tuple(shape), (index, cells))

    def _attention_taken(self, attention, shape) -> bool:
        if attention is None:
            return not self.spec.needs_attention
        return self._takes(attention, torch.float32, shape)

    def _run(self, states, attention, positions, now, prompt_tokens, total, shape, paged):
        """Fill the argument block and call; the victims, or ``None`` where the C++ declined (nothing written)."""
        b, h, t = shape
        now, nows = self._per_row(now, b)
        prompt_tokens, prompts = self._per_row(prompt_tokens, b)
        victim = torch.empty((b, h, 1), dtype=torch.int64)
        with self._lock:
            block = self._block
            block[0], block[1] = b * h, t
            for i, state in enumerate(states):
                self._state_addresses[i] = state.data_ptr()
            block[10] = 0 if attention is None else attention.data_ptr()
            block[11], block[12], block[13] = positions.data_ptr(), now, prompt_tokens
            block[23] = 0 if nows is None else nows.data_ptr()
            block[24] = 0 if prompts is None else prompts.data_ptr()
            block[16], block[17] = total.data_ptr(), victim.data_ptr()
            block[25] = torch.get_num_threads()
            block[26], block[27] = (paged[0].data_ptr(), paged[1]) if paged is not None else (0, 0)
            block[18] = h
            block[21], block[22] = (positions.stride(0), positions.stride(1)) if paged is None else (0, 0)
            if attention is not None:
                block[19], block[20] = attention.stride(0), attention.stride(1)
            status = self._fn(block)
        if status == 1:
            raise RuntimeError(f"momentkv: the native scoring step does not know a part of {self.spec}")
        if status == 4:
            raise ValueError("momentkv: a slot index lies outside the per-slot pools")
        # 2: a slot after `now` (not this step's positions); 3: out of memory. Nothing was written: the tensor
        # step takes this call.
        return None if status else victim


def native_step(spec) -> NativeStep | None:
    """The native step for ``spec``, or ``None`` where it is off or cannot be built (warned once)."""
    if not enabled():
        return None
    fn = _function()
    return None if fn is None else NativeStep(spec, fn)
