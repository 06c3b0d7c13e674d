"""What a prefill compressor is, and the registry of them.

A prefill compressor chooses, at the end of the prompt's forward pass, which prompt tokens each layer and
KV head keeps. It is a pydantic model (its fields are its parameters) with one method, ``select``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, create_model

_COMPRESSORS: dict[str, type["PrefillCompressor"]] = {}


@dataclass
class PrefillContext:
    """What a compressor may read for one layer at the end of the prompt.

    Attributes:
        layer_idx, num_layers: where this layer sits in the model.
        keys: ``(batch, kv_heads, prompt, head_dim)`` the prompt's cached keys (after RoPE).
        window_attention: ``(batch, kv_heads, window, prompt)`` float32 softmax attention of the last
            ``window`` prompt queries (averaged over each GQA group), or ``None`` when the compressor asked
            for no window (``window_size() == 0``).
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

    def capacity(self, prompt_len: int, layer_idx: int, num_layers: int) -> int | None:
        """Prompt tokens this layer keeps for a prompt of ``prompt_len`` tokens; ``None`` keeps all."""
        return None

    def select(self, ctx: PrefillContext, capacity: int) -> torch.Tensor:
        """Indices of the prompt tokens to keep, ``(batch, kv_heads, capacity)`` int64."""
        raise NotImplementedError


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
