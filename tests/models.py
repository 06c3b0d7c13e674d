"""Tiny randomly initialised models of every supported family, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, dtype=torch.float32, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, **overrides):
    """A 2-layer GQA model (4 query heads, 2 KV heads, head_dim 16) with a 128-token vocabulary."""
    config_cls, model_cls = _CLASSES[family]
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    # Random weights put end-of-sequence anywhere; generation lengths are fixed by suppressing it.
    model.generation_config.eos_token_id = None
    return model


def prompts(batch: int = 1, length: int = 7, seed: int = 0, left_pad: bool = True):
    """``input_ids`` and ``attention_mask`` ``(batch, length)``; rows after the first are left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        for row in range(1, batch):
            pad = min(row * 2, length - 1)
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}
