"""Qwen3: per-head q/k RMSNorm before RoPE (inside the module, invisible to the engine); sliding windows as Qwen2."""

from momentkv.patches.base import FamilyAdapter, register_adapter

ADAPTER = register_adapter(
    FamilyAdapter(model_type="qwen3", modeling_module="transformers.models.qwen3.modeling_qwen3", sliding="layer_types")
)
