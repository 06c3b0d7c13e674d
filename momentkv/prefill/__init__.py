"""Prefill compressors: choose which prompt tokens each layer and KV head keeps."""

from momentkv.prefill.base import (
    KeepAll, PrefillCompressor, PrefillContext, prefill_class, prefill_names, register_prefill,
)

__all__ = ["KeepAll", "PrefillCompressor", "PrefillContext", "prefill_class", "prefill_names", "register_prefill"]
