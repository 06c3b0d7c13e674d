"""The supported model families, one row of facts each.

Adding a family whose attention has Llama's shape in transformers (projections, RoPE, ``cache.update``, then
the function ``config._attn_implementation`` names) takes one row: its ``config.model_type``, the
transformers module that defines its ``eager_attention_forward``, and how it assigns sliding windows to
layers (``none``, ``all_layers`` for ``config.sliding_window`` on every layer, ``layer_types`` for the
layers ``config.layer_types`` marks ``sliding_attention``). Then add a tiny config of it to
``tests/models.py``: the identity, oracle and fuzz tests run every family listed there, and
``tests/test_patches.py`` fails while a family of the tests has no row here or a row has no test model.
A family whose attention differs in shape needs engine support first, not a row.
"""

from __future__ import annotations

from momentkv.patches.base import FamilyAdapter

FAMILIES: tuple[FamilyAdapter, ...] = (
    #             model_type  transformers module defining its attention     sliding windows
    FamilyAdapter("llama",   "transformers.models.llama.modeling_llama",     "none"),         # SmolLM2 too
    FamilyAdapter("mistral", "transformers.models.mistral.modeling_mistral", "all_layers"),   # 4096 by default
    FamilyAdapter("qwen2",   "transformers.models.qwen2.modeling_qwen2",     "layer_types"),  # use_sliding_window
    FamilyAdapter("qwen3",   "transformers.models.qwen3.modeling_qwen3",     "layer_types"),  # q/k norm inside
)
