"""The policy language as pydantic models: frozen, unknown fields forbidden, components tagged by ``type``.

A policy has two phases:

- ``prefill``: a prefill compressor (``keep`` by default: the prompt's cache stays intact);
- ``decode``: the budget that holds the generated tokens' cache, the tokens it protects, and the scorers
  whose weighted sum ranks the rest. ``decode: null`` means no decode-time eviction (the full cache).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator,
)

from momentkv.prefill.base import KeepAll, PrefillCompressor, prefill_class, prefill_names
from momentkv.scoring import Scorer, scorer_class, scorer_names


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RatioBudget(_Frozen):
    """A budget that grows with the output: ``clamp(ceil(ratio * generated), floor, cap)`` tokens."""

    ratio: float = Field(..., gt=0.0, le=1.0, description="Fraction of the generated tokens kept, in (0, 1].")
    floor: int = Field(16, ge=1, description="Never fewer tokens than this.")
    cap: int | None = Field(None, ge=1, description="Never more tokens than this (null: no cap).")

    @model_validator(mode="after")
    def _cap_over_floor(self):
        if self.cap is not None and self.cap < self.floor:
            raise ValueError(f"cap ({self.cap}) must be at least floor ({self.floor})")
        return self

    def tokens(self, generated: int) -> int:
        """The budget once ``generated`` tokens have been generated."""
        budget = max(self.floor, math.ceil(self.ratio * generated))
        return budget if self.cap is None else min(budget, self.cap)

    def minimum(self) -> int:
        return self.floor


PositiveInt = Annotated[int, Field(ge=1)]
BudgetValue = PositiveInt | RatioBudget


def _parse_component(value: Any, lookup, names, what: str):
    """Turn ``{type: name, ...}`` into the registered component class (already-built objects pass)."""
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ValueError(f"a {what} is a mapping with a 'type' key, got {type(value).__name__}")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ValueError(f"a {what} needs 'type': one of {', '.join(names())}")
    try:
        cls = lookup(kind)
    except KeyError:
        raise ValueError(f"unknown {what} type {kind!r}; known: {', '.join(names())}") from None
    return cls.model_validate(value)


class DecodePolicy(_Frozen):
    """How the generated tokens' cache is held to a budget."""

    budget: BudgetValue | list[PositiveInt] = Field(
        ...,
        description="Generated tokens kept per layer and KV head: an integer, a ratio budget "
        "{ratio, floor, cap}, or a list of integers interpolated linearly across the layers.",
    )
    sinks: int = Field(0, ge=0, description="The first generated tokens, never evicted.")
    recent: int = Field(0, ge=0, description="The newest tokens (the incoming one included), never evicted.")
    cadence: int = Field(1, ge=1, description="Evict every k steps, down to the budget (1: every step).")
    granularity: Literal["head", "layer"] = Field(
        "head", description="head: each KV head evicts its own tokens; layer: one choice shared by the heads."
    )
    scope: Literal["decode", "all"] = Field(
        "decode", description="decode: only generated tokens are evictable; all: prompt tokens too."
    )
    uncompressed_layers: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Layer indices that keep their whole cache."
    )
    scorers: list[SerializeAsAny[Scorer]] = Field(
        ..., min_length=1, description="Scorers whose weighted sum ranks tokens; the lowest is evicted."
    )

    @field_validator("scorers", mode="before")
    @classmethod
    def _build_scorers(cls, value):
        if not isinstance(value, (list, tuple)):
            raise ValueError("scorers is a list of {type: ...} mappings")
        return [_parse_component(v, scorer_class, scorer_names, "scorer") for v in value]

    @model_validator(mode="after")
    def _budget_holds_protected(self):
        protected = self.sinks + max(self.recent, 1)
        smallest = min(self.layer_budget_minimums())
        if smallest < protected:
            raise ValueError(
                f"budget ({smallest}) must be at least sinks + recent ({self.sinks} + {max(self.recent, 1)}): "
                "the protected tokens alone would exceed it"
            )
        return self

    def layer_budget_minimums(self) -> list[int]:
        if isinstance(self.budget, list):
            return list(self.budget)
        return [self.budget.minimum() if isinstance(self.budget, RatioBudget) else self.budget]

    def budget_for_layer(self, layer_idx: int, num_layers: int) -> int | RatioBudget:
        """This layer's budget: lists are interpolated linearly from the first to the last layer."""
        if not isinstance(self.budget, list):
            return self.budget
        points = self.budget
        if len(points) == 1 or num_layers == 1:
            return points[0]
        if len(points) == num_layers:
            return points[layer_idx]
        x = layer_idx / (num_layers - 1) * (len(points) - 1)
        lo = min(int(math.floor(x)), len(points) - 2)
        frac = x - lo
        return max(1, round(points[lo] * (1 - frac) + points[lo + 1] * frac))

    @property
    def needs_attention(self) -> bool:
        return any(s.needs_attention for s in self.scorers)


class Policy(_Frozen):
    """A complete policy: what the prompt keeps, and how the generated tokens are held to a budget."""

    name: str = Field("custom", description="Short name shown in stats and reports.")
    description: str = Field("", description="One line on what the policy does.")
    prefill: SerializeAsAny[PrefillCompressor] = Field(
        default_factory=KeepAll, description="Prefill compressor; keep (default) leaves the prompt intact."
    )
    decode: DecodePolicy | None = Field(None, description="Decode-time eviction; null keeps every generated token.")

    @field_validator("prefill", mode="before")
    @classmethod
    def _build_prefill(cls, value):
        if value is None:
            return KeepAll()
        return _parse_component(value, prefill_class, prefill_names, "prefill compressor")

    @property
    def evicts(self) -> bool:
        """Whether this policy ever removes a token (otherwise the cache equals the full cache)."""
        return self.decode is not None or self.prefill.type != "keep"
