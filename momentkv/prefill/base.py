"""What a prefill compressor is, the registry of them, and the parts every compressor shares.

A prefill compressor chooses, at the end of the prompt's forward pass, which prompt tokens each layer and
KV head keeps. It is a pydantic model (its fields are its parameters) with three methods: ``window_size``
(how many of the last prompt queries it reads), ``layer_capacity`` (how many prompt tokens a layer keeps)
and ``select`` (which ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

_COMPRESSORS: dict[str, type["PrefillCompressor"]] = {}

#: A prompt budget: an integer is a number of tokens, a float in (0, 1] a fraction of the prompt's length.
Capacity = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0.0, le=1.0)]


@dataclass
class PrefillContext:
    """What a compressor may read for one layer at the end of the prompt.

    Attributes:
        layer_idx, num_layers: where this layer sits in the model.
        keys: ``(batch, kv_heads, prompt, head_dim)`` the prompt's cached keys (after RoPE).
        window_attention: ``(batch, kv_heads, groups, window, prompt)`` float32, the softmax attention of the
            last ``window`` prompt queries, per query head (``groups`` query heads share each KV head), under
            the prompt's causal, padding and sliding-window mask. Rows of padding queries are all zero.
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

    model_config = ConfigDict(extra="forbid", frozen=True)
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


def register_prefill(name: str):
    """Class decorator: make a :class:`PrefillCompressor` subclass available as ``prefill: {type: name}``."""

    def decorate(cls):
        registered = create_model(
            cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, type=(Literal[name], name)
        )
        registered.__qualname__ = cls.__qualname__
        _COMPRESSORS[name] = registered
        return registered

    return decorate


def prefill_class(name: str) -> type[PrefillCompressor]:
    """The compressor class registered as ``name``; ``KeyError`` if none is."""
    return _COMPRESSORS[name]


def prefill_names() -> list[str]:
    return sorted(_COMPRESSORS)


@register_prefill("keep")
class KeepAll(PrefillCompressor):
    """Keep the whole prompt (the Moment-KV default: the prompt's cache stays intact)."""
