"""What the engine needs to know about a model family (:class:`FamilyAdapter`); the families are in
``families.py``.

Every supported family shares Llama's attention shape in transformers 5.x: projections (Qwen3 adds a
per-head RMSNorm on q and k), RoPE, ``cache.update(k, v, layer_idx, kwargs=kwargs)``, then the attention
function looked up by ``config._attn_implementation``. An adapter only states the facts that differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

#: How a family assigns sliding windows to layers (see :attr:`FamilyAdapter.sliding`).
SLIDING_RULES = ("none", "all_layers", "layer_types")


@dataclass(frozen=True)
class FamilyAdapter:
    """Facts about one model family.

    Attributes:
        model_type: ``config.model_type`` of the family.
        modeling_module: the transformers module defining the family's attention (holds its eager function).
        sliding: how the family assigns sliding windows to layers: ``none`` (Llama), ``all_layers`` (Mistral:
            ``config.sliding_window`` on every layer when set), ``layer_types`` (Qwen2/3: the layers whose
            ``config.layer_types`` entry is ``sliding_attention``).
    """

    model_type: str
    modeling_module: str
    sliding: str = "none"

    def __post_init__(self):
        if self.sliding not in SLIDING_RULES:
            raise ValueError(f"{self.model_type}: sliding must be one of {', '.join(SLIDING_RULES)}, "
                             f"got {self.sliding!r}")

    def eager_attention(self) -> Callable:
        """The family's own eager attention function (what ``attn_implementation="eager"`` runs)."""
        return importlib.import_module(self.modeling_module).eager_attention_forward

    def sliding_windows(self, config) -> list[int | None]:
        """Per layer, the sliding window in tokens, or ``None`` for full attention."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if self.sliding == "none" or window is None:
            return [None] * n
        if self.sliding == "all_layers":
            return [window] * n
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        return [window if t == "sliding_attention" else None for t in types]
