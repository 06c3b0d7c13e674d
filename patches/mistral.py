"""Mistral: `config.sliding_window` (4096 by default) applies to every layer."""

from momentkv.patches.base import FamilyAdapter, register_adapter

ADAPTER = register_adapter(
    FamilyAdapter(model_type="mistral", modeling_module="transformers.models.mistral.modeling_mistral", sliding="all_layers")
)
