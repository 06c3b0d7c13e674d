"""Llama (and SmolLM2): full attention in every layer."""

from momentkv.patches.base import FamilyAdapter, register_adapter

ADAPTER = register_adapter(
    FamilyAdapter(model_type="llama", modeling_module="transformers.models.llama.modeling_llama", sliding="none")
)
