"""The supported model families, one row of facts each.

Adding a family whose attention has Llama's shape in transformers (projections, RoPE, ``cache.update``, then
the function ``config._attn_implementation`` names) takes one row: its ``config.model_type``, the
transformers module that defines its ``eager_attention_forward``, how it assigns sliding windows to layers
(``none``, ``all_layers`` for ``config.sliding_window`` on every layer, ``layer_types`` for the layers
``config.layer_types`` marks ``sliding_attention``), its attention class, the keywords that class passes to
the attention function (``scaling`` is whatever the family computes: 1/sqrt(head_dim), Granite's attention
multiplier, Gemma's ``query_pre_attn_scalar``; ``softcap`` and ``s_aux`` sinks are honoured by the single
pass), and the config settings of checkpoint variants the engine refuses. Then add a tiny config of it to
``tests/models.py``: the identity, oracle, property and fuzz tests run every family listed there;
``tests/test_patches.py`` fails while a family of the tests has no row here or a row has no test model, and
``tests/test_families.py`` while the family's transformers source no longer does what its row says.
A family whose attention differs in shape needs engine support first, not a row.
"""

from __future__ import annotations

from momentkv.patches.base import FamilyAdapter

_TF = "transformers.models"
_BASE = ("dropout", "scaling")
_SLIDING = ("dropout", "scaling", "sliding_window")

FAMILIES: tuple[FamilyAdapter, ...] = (
    #             model_type  transformers module defining its attention   sliding windows  attention class
    FamilyAdapter("llama",     f"{_TF}.llama.modeling_llama",             "none",          "LlamaAttention", _BASE),
    FamilyAdapter("mistral",   f"{_TF}.mistral.modeling_mistral",         "all_layers",    "MistralAttention",
                  _SLIDING),  # 4096 by default
    FamilyAdapter("qwen2",     f"{_TF}.qwen2.modeling_qwen2",             "layer_types",   "Qwen2Attention",
                  _SLIDING),  # use_sliding_window
    FamilyAdapter("qwen3",     f"{_TF}.qwen3.modeling_qwen3",             "layer_types",   "Qwen3Attention",
                  _SLIDING),  # per-head q/k norm inside
    # Qwen3's attention in a mixture-of-experts model; use_sliding_window slides every layer (no layer_types).
    FamilyAdapter("qwen3_moe", f"{_TF}.qwen3_moe.modeling_qwen3_moe",     "all_layers",    "Qwen3MoeAttention",
                  _SLIDING),
    # q/k RMSNorm over the whole projection, before the heads are split: keys are cached after it.
    FamilyAdapter("olmo2",     f"{_TF}.olmo2.modeling_olmo2",             "none",          "Olmo2Attention", _BASE),
    FamilyAdapter("olmo3",     f"{_TF}.olmo3.modeling_olmo3",             "layer_types",   "Olmo3Attention",
                  _SLIDING),  # three sliding layers to one global
    # scaling = config.attention_multiplier (not 1/sqrt(d)), passed as the scaling keyword.
    FamilyAdapter("granite",   f"{_TF}.granite.modeling_granite",         "none",          "GraniteAttention", _BASE),
    # Phi-3/Phi-4: fused qkv projection; Phi-3-mini's sliding_window (2047) applies to every layer.
    FamilyAdapter("phi3",      f"{_TF}.phi3.modeling_phi3",               "all_layers",    "Phi3Attention",
                  _SLIDING),
    # NoPE layers (no RoPE, no_rope_layers) interleaved with RoPE layers: keys are cached as they are.
    FamilyAdapter("smollm3",   f"{_TF}.smollm3.modeling_smollm3",         "layer_types",   "SmolLM3Attention",
                  _SLIDING),
    # scaling = query_pre_attn_scalar ** -0.5; per-head q/k norm; sliding layers interleaved by layer_types.
    # transformers' Gemma 3 never passes attn_logit_softcapping to its attention (nor does momentkv).
    FamilyAdapter("gemma3_text", f"{_TF}.gemma3.modeling_gemma3",         "layer_types",   "Gemma3Attention",
                  _SLIDING, refused=(("use_bidirectional_attention", "bidirectional attention"),)),
    # Gemma 2: attention logit soft-capping (tanh(logits / cap) * cap before the mask), computed by the single
    # pass; sliding layers interleaved by layer_types. transformers serves it with eager attention only.
    FamilyAdapter("gemma2",    f"{_TF}.gemma2.modeling_gemma2",           "layer_types",   "Gemma2Attention",
                  (*_SLIDING, "softcap")),
    # GPT-OSS: learned attention sinks (one logit per query head in the softmax's denominator, never a cached
    # token: never scored or evicted); alternating sliding layers; a mixture of experts. Eager attention only.
    FamilyAdapter("gpt_oss",   f"{_TF}.gpt_oss.modeling_gpt_oss",         "layer_types",   "GptOssAttention",
                  (*_SLIDING, "s_aux")),
)
