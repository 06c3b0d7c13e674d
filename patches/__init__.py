"""Model families, keyed by ``config.model_type``: the facts the engine needs (``families.py`` lists them)."""

from momentkv.patches.base import FamilyAdapter
from momentkv.patches.families import FAMILIES, NOT_SERVED

ADAPTERS: dict[str, FamilyAdapter] = {adapter.model_type: adapter for adapter in FAMILIES}
if len(ADAPTERS) != len(FAMILIES):
    raise ValueError("patches/families.py lists a model_type twice")

SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def not_served(model_type: str) -> str | None:
    """The attention feature that keeps a family transformers ships from being supported, if momentkv knows it."""
    return NOT_SERVED.get(model_type)


def adapter_for(model_type: str) -> FamilyAdapter | None:
    """The adapter of ``model_type``; ``None`` for a family momentkv does not support."""
    return ADAPTERS.get(model_type)


__all__ = ["ADAPTERS", "FamilyAdapter", "SUPPORTED_MODEL_TYPES", "adapter_for", "not_served"]
