"""Qwen2: sliding windows only with `use_sliding_window`, on the layers `config.layer_types` marks."""

from momentkv.patches.base import FamilyAdapter, register_adapter

ADAPTER = register_adapter(
    FamilyAdapter(model_type="qwen2", modeling_module="transformers.models.qwen2.modeling_qwen2", sliding="layer_types")
)
