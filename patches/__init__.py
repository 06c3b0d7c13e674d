"""Model families, keyed by ``config.model_type``: the facts the engine needs (``families.py`` lists them)."""

from momentkv.patches.base import FamilyAdapter
from momentkv.patches.families import FAMILIES

ADAPTERS: dict[str, FamilyAdapter] = {adapter.model_type: adapter for adapter in FAMILIES}
if len(ADAPTERS) != len(FAMILIES):
    raise ValueError("patches/families.py lists a model_type twice")

SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def adapter_for(model_type: str) -> FamilyAdapter | None:
    """The adapter of ``model_type``; ``None`` for a family momentkv does not support."""
    return ADAPTERS.get(model_type)


__all__ = ["ADAPTERS", "FamilyAdapter", "SUPPORTED_MODEL_TYPES", "adapter_for"]
