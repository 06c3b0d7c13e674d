"""One small adapter per model family, keyed by ``config.model_type``: the facts the engine needs."""

from momentkv.patches import llama, mistral, qwen2, qwen3  # noqa: F401  (each registers its adapter)
from momentkv.patches.base import ADAPTERS, FamilyAdapter, adapter_for

SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))

__all__ = ["ADAPTERS", "FamilyAdapter", "SUPPORTED_MODEL_TYPES", "adapter_for"]
