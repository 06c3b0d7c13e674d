"""What a scorer is: a small pydantic model whose fields are its parameters, with one method over tensors.

A scorer ranks the evictable tokens of one cache layer; the lowest combined score is evicted first.
Every tensor it sees is shaped ``(batch, kv_heads, tokens)`` where ``tokens`` counts the layer's evictable
slots (the generated tokens, unless the policy makes the prompt evictable too). A scorer keeps no state of
its own: the cache layer owns one float32 ``state`` tensor per scorer, which moves with the slots through
eviction, beam reordering and batch selection.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Normalization = Literal["none", "sum", "max", "zscore", "rank"]


class ScoreContext:
    """What a scorer may read at one decode step of one layer.

    Attributes:
        attention: ``(batch, kv_heads, tokens)`` float32, the softmax attention that the current query gives
            each evictable token, averaged over the query heads that share its KV head; ``None`` when no
            scorer of the policy asks for attention.
        age: ``(batch, kv_heads, tokens)`` float32, decode steps since the token entered the cache (0 for
            the token written at this step). Computed on first use, from ``positions`` and ``now``, when
            not given.
        keys: ``(batch, kv_heads, tokens, head_dim)``, the cached keys of the evictable tokens (after RoPE).
        state: ``(batch, kv_heads, tokens)`` float32, this scorer's memory; a new token's entry starts at 0.
            Update it in place.
    """

    __slots__ = ("attention", "keys", "state", "_age", "_positions", "_now")

    def __init__(self, attention, keys, state, age=None, positions=None, now=None):
        self.attention, self.keys, self.state = attention, keys, state
        self._age, self._positions, self._now = age, positions, now

    @property
    def age(self) -> torch.Tensor:
        if self._age is None:
            self._age = (self._now - self._positions).to(torch.float32)
        return self._age


class Scorer(BaseModel):
    """Base class of every scorer. Subclass it, add pydantic fields for the parameters, implement ``update``.

    ``type`` is the name the policy language uses; ``weight`` and ``normalize`` say how the scorer's output
    joins the weighted sum that ranks tokens.
    """

    # strict: a quoted "0.5" or a bool where a number belongs is a mistake in a policy file, not a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    weight: float = Field(
        1.0, allow_inf_nan=False,
        description="Factor of this scorer in the weighted sum of scores (finite; 0 mutes the scorer).",
    )
    normalize: Normalization = Field(
        "none",
        description="Rescaling per (batch, kv head) before weighting, so scorers of different scales combine: "
        "none, sum (divide by the sum), max (divide by the maximum), zscore, rank (0 for the lowest, 1 for the highest).",
    )

    #: Whether ``ScoreContext.attention`` must be computed for this scorer (costs one q.K pass per layer).
    needs_attention: ClassVar[bool] = True

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        """Return this step's scores, ``(batch, kv_heads, tokens)`` float32; higher means keep."""
        raise NotImplementedError
