"""What the engine needs to know about a model family (:class:`FamilyAdapter`); the families are in
``families.py``.

Every supported family shares Llama's attention shape in transformers 5.x: projections (some add q/k norms,
some fuse the projections), RoPE (or none, on NoPE layers), ``cache.update(k, v, layer_idx, kwargs=kwargs)``,
then the attention function looked up by ``config._attn_implementation``, called with ``dropout``,
``scaling`` and the family's own keywords. An adapter only states the facts that differ; what each row
assumes of the family's source is checked against transformers by ``tests/test_families.py``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable

#: How a family assigns sliding windows to layers (see :attr:`FamilyAdapter.sliding`).
SLIDING_RULES = ("none", "all_layers", "layer_types")

#: The keywords an attention module may pass to its attention function that the engine honours: ``dropout``
#: and ``scaling`` (every family), ``sliding_window`` (applied by the cache layer's mask, from the row's rule),
#: ``softcap`` (tanh soft-capping of the logits) and ``s_aux`` (learned attention sinks, one logit per query
#: head). A family passing any other keyword changes its attention in a way the engine does not know.
HANDLED_ATTENTION_KEYWORDS = ("dropout", "scaling", "sliding_window", "softcap", "s_aux")

#: The call by which every supported attention module hands its keys and values to the cache.
CACHE_UPDATE_CALL = "cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)"


@dataclass(frozen=True)
class FamilyAdapter:
    """Facts about one model family.

    Attributes:
        model_type: ``config.model_type`` of the family.
        modeling_module: the transformers module defining the family's attention (holds its eager function).
        sliding: how the family assigns sliding windows to layers: ``none`` (Llama), ``all_layers`` (Mistral:
            ``config.sliding_window`` on every layer when set), ``layer_types`` (Qwen2/3, Gemma: the layers whose
            ``config.layer_types`` entry is ``sliding_attention``).
        attention_class: the name of the family's attention module class in ``modeling_module``.
        attention_keywords: the keywords its ``forward`` passes to the attention function besides ``**kwargs``
            (each one of :data:`HANDLED_ATTENTION_KEYWORDS`).
        refused: ``(config attribute, feature)`` pairs: a checkpoint whose config sets the attribute (truthy)
            uses an attention feature the engine does not serve, and ``patch`` refuses it, naming the feature.
    """

    model_type: str
    modeling_module: str
    sliding: str = "none"
    attention_class: str = ""
    attention_keywords: tuple[str, ...] = ("dropout", "scaling")
    refused: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.sliding not in SLIDING_RULES:
            raise ValueError(f"{self.model_type}: sliding must be one of {', '.join(SLIDING_RULES)}, "
                             f"got {self.sliding!r}")
        unknown = [k for k in self.attention_keywords if k not in HANDLED_ATTENTION_KEYWORDS]
        if unknown:
            raise ValueError(f"{self.model_type}: the engine does not honour the attention keyword(s) "
                             f"{', '.join(unknown)}; it honours {', '.join(HANDLED_ATTENTION_KEYWORDS)}")

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

    def unsupported_features(self, config) -> list[str]:
        """The attention features of this checkpoint's ``config`` that the engine refuses (see ``refused``)."""
        return [f"{feature} ({name}={getattr(config, name)!r})" for name, feature in self.refused
                if getattr(config, name, None)]

    def attention_source_facts(self) -> tuple[list[str], list[str]]:
        """What the installed transformers' attention ``forward`` of this family does, read from its source:
        the ``cache.update`` calls, and the keywords of its attention-function call (``**kwargs`` excluded)."""
        cls = getattr(importlib.import_module(self.modeling_module), self.attention_class)
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        updates = [ast.unparse(c) for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr == "update"]
        keywords = [k.arg for c in calls if isinstance(c.func, ast.Name) and c.func.id == "attention_interface"
                    for k in c.keywords if k.arg is not None]
        return updates, keywords
