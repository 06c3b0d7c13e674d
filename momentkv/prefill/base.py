"""What a prefill compressor is, the registry of them, and the parts every compressor shares.

A prefill compressor chooses, at the end of the prompt's forward pass, which prompt tokens each layer and
KV head keeps. In a conversation continued through the same cache, each later user turn is compressed the
same way, on its own, when it is complete: to a compressor, a turn is a prompt (its tokens, its capacity,
its own last queries); the context kept before it is not offered again (see docs/prefill.md). It is a pydantic model (its fields are its parameters, validated strictly as a scorer's are)
with three methods: ``window_size`` (how many of the last prompt queries it reads), ``layer_capacity`` (how
many prompt tokens a layer keeps) and ``select`` (which ones).

The registry is a :class:`~momentkv.registry.ComponentRegistry`, with the rules scorers follow; installed
packages add compressors through the entry-point group ``momentkv.prefill``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from momentkv.registry import ComponentRegistry


def _capacity_kind(value: Any) -> str | None:
    """Which form of capacity ``value`` is written in; ``None`` (one clear error) for neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "tokens"
    if isinstance(value, float):
        return "fraction"
    return None


#: A prompt budget: an integer is a number of tokens, a float in (0, 1] a fraction of the prompt's length.
#: Tagged by the Python type, so ``"128"`` or ``true`` gets one error naming both forms.
Capacity = Annotated[
    Annotated[int, Field(ge=1), Tag("tokens")] | Annotated[float, Field(gt=0.0, le=1.0), Tag("fraction")],
    Discriminator(
        _capacity_kind,
        custom_error_type="capacity_form",
        custom_error_message="must be an integer (prompt tokens) or a number in (0, 1] (a fraction of the prompt)",
    ),
]


@dataclass
class PrefillContext:
    """What a compressor may read for one layer at the end of the prompt (or of a later user turn).

    ``prompt`` below is the chunk being compressed: the first prompt, or a later turn of a conversation on
    its own (the context kept before it is not part of it).

    Attributes:
        layer_idx, num_layers: where this layer sits in the model.
        keys: ``(batch, kv_heads, prompt, head_dim)`` the prompt's cached keys (after RoPE).
        window_attention: ``(batch, kv_heads, groups, window, prompt)`` float32, the softmax attention of the
            last ``window`` prompt queries, per query head (``groups`` query heads share each KV head), under
            the prompt's causal, padding and sliding-window mask. Rows of padding queries are all zero.
            For a later turn the softmax runs over every key its queries attended to (the earlier context
            and generated tokens the cache holds too), and only the turn's columns are given: a row then
            sums to less than one.
            ``None`` when the compressor asked for no window (``window_size() == 0``). ``window`` may be
            smaller than asked for when the prompt is shorter.
        valid: ``(batch, prompt)`` bool, False at padding.
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor
    window_attention: torch.Tensor | None
    valid: torch.Tensor


class PrefillCompressor(BaseModel):
    """Base class: choose the prompt tokens to keep. ``keep`` (the default) keeps all of them."""

    # strict, as scorers: `window: true` or `capacity: "128"` in a policy file is a mistake, not a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type: str

    def window_size(self) -> int:
        """How many of the last prompt queries' attention ``select`` needs (0: none)."""
        return 0

    def layer_capacity(self, prompt_len: int, layer_idx: int, num_layers: int) -> int | None:
        """Prompt tokens this layer keeps for a prompt of ``prompt_len`` tokens; ``None`` keeps all."""
        return None

    def select(self, ctx: PrefillContext, capacity: int) -> torch.Tensor:
        """Indices of the prompt tokens to keep, ``(batch, kv_heads, capacity)`` int64."""
        raise NotImplementedError


class BudgetedCompressor(PrefillCompressor):
    """A compressor that keeps ``capacity`` prompt tokens per layer and KV head (tokens, or a ratio)."""

    capacity: Capacity = Field(
        1024, description="Prompt tokens kept per layer and KV head: an integer, or a fraction of the prompt "
        "length in (0, 1]. A prompt no longer than this is kept whole."
    )

    def layer_capacity(self, prompt_len: int, layer_idx: int, num_layers: int) -> int | None:
        return resolve_capacity(self.capacity, prompt_len)


def resolve_capacity(capacity: int | float, prompt_len: int) -> int:
    """Tokens kept of a ``prompt_len``-token prompt: an int as is, a ratio floored (at least one token)."""
    if isinstance(capacity, float):
        return max(1, math.floor(capacity * prompt_len))
    return capacity


def keep_top(scores: torch.Tensor, valid: torch.Tensor, capacity: int) -> torch.Tensor:
    """The ``capacity`` highest-scoring slots per (batch row, KV head), padding last.

    Args:
        scores: ``(batch, kv_heads, prompt)``; higher means keep. May hold ``+inf`` for forced keeps.
        valid: ``(batch, prompt)`` bool, False at padding: padding scores ``-inf``, so it is chosen only
            when a row has fewer real tokens than ``capacity`` (it then stays masked by its validity).

    Returns:
        ``(batch, kv_heads, capacity)`` int64 slot indices (unordered).
    """
    ranked = scores.float().masked_fill(~valid.unsqueeze(1), float("-inf"))
    return ranked.topk(capacity, dim=-1).indices


def _required(cls: type[PrefillCompressor]) -> tuple[str, ...]:
    """``select``, unless ``layer_capacity`` is the base's (``None``: every prompt token kept, nothing chosen)."""
    return () if cls.layer_capacity is PrefillCompressor.layer_capacity else ("select",)


PREFILL = ComponentRegistry(PrefillCompressor, "prefill compressor", "momentkv.prefill", required=_required)

#: Class decorator: make a :class:`PrefillCompressor` subclass available as ``prefill: {type: name}``.
register_prefill = PREFILL.register
#: The compressor class registered as ``name``; ``KeyError`` if none is.
prefill_class = PREFILL.get
#: Names of all registered compressors (installed plugins included), sorted.
prefill_names = PREFILL.names


@register_prefill("keep")
class KeepAll(PrefillCompressor):
    """Keep the whole prompt (the Moment-KV default: the prompt's cache stays intact)."""
