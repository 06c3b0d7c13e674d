"""Prefill compressors: choose which prompt tokens each layer and KV head keeps.

Built-ins: ``keep`` (the default: the prompt stays intact), ``snapkv``, ``pyramidkv``, ``streamingllm``,
``knorm``. ``register_prefill`` adds one.
"""

from momentkv.prefill.base import (
    BudgetedCompressor, KeepAll, PrefillCompressor, PrefillContext, keep_top, prefill_class, prefill_names,
    register_prefill,
)
from momentkv.prefill.knorm import KNorm
from momentkv.prefill.pyramidkv import PyramidKV
from momentkv.prefill.snapkv import SnapKV
from momentkv.prefill.streamingllm import StreamingLLM

__all__ = [
    "BudgetedCompressor", "KNorm", "KeepAll", "PrefillCompressor", "PrefillContext", "PyramidKV", "SnapKV",
    "StreamingLLM", "keep_top", "prefill_class", "prefill_names", "register_prefill",
]
