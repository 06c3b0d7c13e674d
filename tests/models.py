"""Tiny randomly initialised models of every supported family, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig, GptOssForCausalLM,
    GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, SmolLM3Config,
    SmolLM3ForCausalLM,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "olmo3", "granite", "phi3", "smollm3",
            "gemma3_text", "gemma2", "gpt_oss")
# transformers serves these with eager attention only (its SDPA cannot soft-cap logits or take sinks, and it
# refuses set_attn_implementation("sdpa")): tiny_model builds them eager whatever ``attn`` asks, so every test
# that runs a family under SDPA and eager runs these under eager twice.
EAGER_ONLY = ("gemma2", "gpt_oss")
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "olmo3": (Olmo3Config, Olmo3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM),
}
# What each new family's tiny config sets beyond the shared sizes: the feature its attention differs by is on
# (NoPE layers, a scale other than 1/sqrt(d)); mixtures of experts get 4 small experts. Sliding layers keep the
# family's default window (4096), which no test reaches unless it sets one (as Mistral's tiny config has none):
# tests/test_families.py sets windows of 6 on every sliding family.
_FAMILY_DEFAULTS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "granite": dict(attention_multiplier=0.2, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "smollm3": dict(no_rope_layer_interval=2),  # every second layer without RoPE
    "gemma2": dict(query_pre_attn_scalar=24),  # soft-capping at 50
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window_pattern=2),  # every other layer slides
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# Families with a per-head q/k RMSNorm: at their initial gains every key has the same norm up to rounding (a
# key_norm scorer would see nothing but near-ties); their tiny models get gains spread as training leaves them.
# (Qwen3 keeps its initial gains here: tests/oracle.py's untie_key_norms spreads them where a test needs it.)
_TRAINED_NORMS = ("qwen3_moe", "gemma3_text")


def _spread_norm_gains(model, seed: int) -> None:
    """Add a draw from ``[-0.5, 0.5)`` to each q/k norm's gains (1 for Qwen, 1 + 0 for Gemma's ``1 + w``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.add_((torch.rand(norm.weight.shape, generator=g) - 0.5).to(norm.weight.dtype))


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
    kwargs.update(_FAMILY_DEFAULTS.get(family, {}))
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    if family in _TRAINED_NORMS:
        _spread_norm_gains(model, seed)
    model.set_attn_implementation("eager" if family in EAGER_ONLY else attn)
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
