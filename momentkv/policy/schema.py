"""The policy language as pydantic models: frozen, strict, unknown fields forbidden, components tagged by ``type``.

A policy has two phases:

- ``prefill``: a prefill compressor (``keep`` by default: the prompt's cache stays intact);
- ``decode``: the budget that holds the generated tokens' cache, the tokens it protects, and the scorers
  whose weighted sum ranks the rest. ``decode: null`` means no decode-time eviction (the full cache).

Components (scorers, prefill compressors) are written ``{type: name, ...}`` and looked up in their registries
(:mod:`momentkv.registry`) at validation time, so a component registered after this module was imported (by a
user, or through the ``momentkv.scorers`` and ``momentkv.prefill`` entry points) is as valid as a built-in one.
A component's own validation errors are carried up with their field paths (see :func:`component_errors`), and
cross-field rules report the exact field that breaks them, so the loader can point at a YAML line for each.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, SerializeAsAny, Tag, ValidationError,
    field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from momentkv.prefill.base import PREFILL, KeepAll, PrefillCompressor
from momentkv.registry import ComponentRegistry
from momentkv.schedule import interpolate
from momentkv.scoring import Scorer
from momentkv.scoring.registry import SCORERS


class _Frozen(BaseModel):
    # strict: YAML already gives typed scalars; `sinks: true` or `budget: "128"` is a mistake, not a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _listify(value: Any) -> Any:
    """Tuples are lists in the Python API (strict validation would reject them otherwise)."""
    return list(value) if isinstance(value, tuple) else value


def rule_error(problems: list[tuple]) -> PydanticCustomError:
    """A cross-field error that names, for each problem, the field (relative to the model) that breaks it.

    Each problem is ``(at, message)`` or ``(at, message, others)``: ``others`` lists the other fields the rule
    reads, as ``(at, message or None)``. The loader reports the problem at the field written last (by the
    extending file rather than its base; see :func:`momentkv.policy.errors.problems_from_validation`), with that
    field's message, and names where the other fields were written; ``None``: the field can carry no message
    of its own (changing it alone cannot fix the problem).
    """
    details = "; ".join(f"{'.'.join(map(str, at)) or '(model)'}: {msg}" for at, msg, *_ in problems)
    return PydanticCustomError("policy_rule", "{details}", {"details": details, "problems": problems})


class RatioBudget(_Frozen):
    """A budget that grows with the output: ``clamp(ceil(ratio * generated), floor, cap)`` tokens."""

    ratio: float = Field(..., gt=0.0, le=1.0, description="Fraction of the generated tokens kept.")
    floor: int = Field(16, ge=1, description="Never fewer tokens than this (the budget of the first steps).")
    cap: int | None = Field(None, ge=1, description="Never more tokens than this; null: no cap.")

    @model_validator(mode="after")
    def _cap_over_floor(self):
        if self.cap is not None and self.cap < self.floor:
            raise rule_error([(("cap",), f"must be at least floor ({self.floor}), got {self.cap}",
                               [(("floor",), f"must be at most cap ({self.cap}), got {self.floor}")])])
        return self

    def budget_at(self, generated: int) -> int:
        """The budget once ``generated`` tokens have been generated."""
        budget = max(self.floor, math.ceil(self.ratio * generated))
        return budget if self.cap is None else min(budget, self.cap)

    def tokens(self, generated: int) -> int:
        """Kept for compatibility: the old name of :meth:`budget_at` (``RatioBudget`` is public API)."""
        return self.budget_at(generated)

    def minimum(self) -> int:
        return self.floor


PositiveInt = Annotated[int, Field(ge=1)]
LayerIndex = Annotated[int, Field(ge=0)]


class BudgetFraction(_Frozen):
    """Protected tokens as a share of the layer's budget: ``floor(fraction * budget)`` tokens.

    A protection written this way keeps its meaning when the budget changes (``extends`` with another
    budget, a layer schedule, ``momentkv eval --budgets``): H2O's recent window stays half the budget rather
    than swallowing a smaller one. A ratio budget protects against its ``floor``, the smallest it ever is.
    """

    fraction: float = Field(..., ge=0.0, le=1.0, description="Share of the layer's budget, in [0, 1].")

    def protected(self, budget: int) -> int:
        """Tokens protected in a layer whose budget is ``budget`` tokens."""
        # rounded before the floor: 0.29 * 100 is 28.999999999999996 in binary floating point
        return math.floor(round(self.fraction * budget, 6))


def _protection_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "protect:tokens"  # a float is reported as "must be an integer", not as a form error
    if isinstance(value, (dict, BudgetFraction)):
        return "protect:fraction"
    return None


Protection = Annotated[
    Annotated[Annotated[int, Field(ge=0)], Tag("protect:tokens")]
    | Annotated[BudgetFraction, Tag("protect:fraction")],
    Discriminator(
        _protection_kind,
        custom_error_type="protection_form",
        custom_error_message="must be an integer (tokens) or {fraction: f} (a share of the layer's budget)",
    ),
]


def protected_tokens(value: int | BudgetFraction, budget: int) -> int:
    """Tokens that a ``sinks`` or ``recent`` value protects in a layer whose budget is ``budget`` tokens."""
    return value.protected(budget) if isinstance(value, BudgetFraction) else value


def _show_protection(value: int | BudgetFraction) -> str:
    return f"{{fraction: {value.fraction:g}}}" if isinstance(value, BudgetFraction) else str(value)


def _budget_kind(value: Any) -> str | None:
    """Which form of budget ``value`` is written in; ``None`` for none of them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "budget:tokens"  # a float is reported as "must be an integer", not as a form error
    if isinstance(value, (dict, RatioBudget)):
        return "budget:ratio"
    if isinstance(value, (list, tuple)):
        return "budget:schedule"
    return None


BudgetValue = Annotated[
    Annotated[PositiveInt, Tag("budget:tokens")]
    | Annotated[RatioBudget, Tag("budget:ratio")]
    | Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(_listify), Tag("budget:schedule")],
    Discriminator(
        _budget_kind,
        custom_error_type="budget_form",
        custom_error_message="must be an integer, a {ratio, floor, cap} mapping, or a list of integers",
    ),
]


def component_errors(err: ValidationError) -> list[dict]:
    """The errors of a component, kept with their field paths for the loader to place."""
    return err.errors(include_url=False)


def _component_parser(registry: ComponentRegistry):
    """A validator turning ``{type: name, ...}`` (or ``name``) into the class ``registry`` holds as ``name``."""
    base, what = registry.base, registry.kind

    def parse(value: Any) -> Any:
        if isinstance(value, base):
            registered = registry.resolve(value.type)
            if registered is not type(value):
                raise PydanticCustomError(
                    "component_unregistered",
                    "{cls} is not the {what} registered as {name}; decorate it with the register function",
                    {"cls": type(value).__qualname__, "what": what, "name": repr(value.type)},
                )
            return value
        if isinstance(value, str):
            value = {"type": value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "component_form", "a {what} is a mapping with a type (type: name, ...) or a name", {"what": what}
            )
        kind = value.get("type")
        if "type" not in value:
            raise PydanticCustomError(
                "component_type_missing", "a {what} needs 'type', one of: {known}",
                {"what": what, "known": ", ".join(registry.names())},
            )
        cls = registry.resolve(kind)
        if cls is None:
            broken = registry.failure(kind) if isinstance(kind, str) else None
            if broken is not None:  # an installed plugin declares it, but could not be loaded
                raise PydanticCustomError(
                    "component_plugin_broken", "{what} type {kind} cannot be used: {broken}",
                    {"what": what, "kind": repr(kind), "broken": broken, "at": ("type",)},
                )
            raise PydanticCustomError(
                "component_type_unknown",
                "unknown {what} type {kind}; known: {known}",
                {"what": what, "kind": repr(kind), "known": ", ".join(registry.names()), "at": ("type",)},
            )
        try:
            return cls.model_validate(value)
        except ValidationError as err:
            errors = component_errors(err)
            details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            raise PydanticCustomError(
                "component_invalid", "{what} {kind}: {details}",
                {"what": what, "kind": repr(kind), "details": details, "errors": errors},
            ) from None

    return parse


def _parse_scorers(value: Any) -> Any:
    return _listify(value)


ScorerItem = Annotated[SerializeAsAny[Scorer], BeforeValidator(_component_parser(SCORERS))]
PrefillItem = Annotated[SerializeAsAny[PrefillCompressor], BeforeValidator(_component_parser(PREFILL))]


class DecodePolicy(_Frozen):
    """How the generated tokens' cache is held to a budget."""

    budget: BudgetValue = Field(
        ...,
        description="Evictable tokens kept per layer and KV head: an integer; a ratio budget {ratio, floor, cap} "
        "that grows with the output; or a list of integers interpolated linearly from the first layer to the "
        "last (a layer budget schedule).",
    )
    sinks: Protection = Field(
        0, description="The first generated tokens, never evicted (attention sinks): a number of tokens, or "
        "{fraction: f} of the layer's budget.",
    )
    recent: Protection = Field(
        0, description="The newest tokens, never evicted: a number of tokens, or {fraction: f} of the layer's "
        "budget (H2O: {fraction: 0.5}); the incoming token is always kept, so 0 acts as 1.",
    )
    cadence: int = Field(
        1, ge=1,
        description="Evict every k steps, down to the budget, amortising the ranking: between evictions the "
        "layer holds up to budget + cadence - 1 tokens. 1: evict one token each step once full.",
    )
    granularity: Literal["head", "layer"] = Field(
        "head", description="head: each KV head evicts its own tokens; layer: one choice shared by the heads."
    )
    scope: Literal["decode", "all"] = Field(
        "decode",
        description="decode: only generated tokens are evictable (the prompt stays); all: prompt tokens too, "
        "and the budget counts them.",
    )
    uncompressed_layers: Annotated[list[LayerIndex], BeforeValidator(_listify)] = Field(
        default_factory=list, description="Layer indices (0-based) that keep their whole cache."
    )
    scorers: Annotated[list[ScorerItem], BeforeValidator(_parse_scorers)] = Field(
        ..., min_length=1,
        description="Scorers whose weighted sum ranks the evictable tokens; the lowest is evicted.",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self):
        problems = self._protection_problems()
        smallest = min(self.layer_budget_minimums())
        if self.cadence > smallest:
            why = "between evictions a layer would hold more than twice its budget"
            at = self._budget_places()[self.layer_budget_minimums().index(smallest)][0]
            problems.append((("cadence",), f"must be at most the smallest budget ({smallest}), got {self.cadence}: "
                             f"{why}", [(at, f"must be at least the cadence ({self.cadence}), got {smallest}: {why}")]))
        seen: dict[int, int] = {}
        for i, layer in enumerate(self.uncompressed_layers):
            if layer in seen:
                problems.append((("uncompressed_layers", i), f"layer {layer} is already listed at [{seen[layer]}]"))
            seen.setdefault(layer, i)
        if all(s.weight == 0 for s in self.scorers):
            problems.append((("scorers",), "at least one scorer needs a non-zero weight"))
        if problems:
            raise rule_error(problems)
        return self

    def _protection_problems(self) -> list[tuple[tuple, str]]:
        """The budget must hold the protected tokens in every layer.

        Each written budget is checked: an integer, each point of a schedule, a ratio budget's floor. That
        covers every layer's interpolated budget, which lies between two points: with integer protections the
        smallest point is the hardest; with one fraction, ``budget - protected`` never falls as the budget
        grows (the fraction's share grows by at most one token per token of budget); with two, fractions
        adding up to at most 1 (checked here) fit any budget once the sinks' fraction is below 1 (which
        the points check).
        """
        problems = []
        relative = isinstance(self.sinks, BudgetFraction) or isinstance(self.recent, BudgetFraction)
        if isinstance(self.sinks, BudgetFraction) and isinstance(self.recent, BudgetFraction):
            total = self.sinks.fraction + self.recent.fraction
            if total > 1.0:  # the cause of every budget they overflow: reported once, here
                message = (f"sinks and recent fractions add up to {total:g}: together they may protect at most the "
                           "whole budget (1)")
                return [(("recent", "fraction"), message, [(("sinks", "fraction"), message)])]
        for at, value in self._budget_places():
            sinks, recent = self.protections_for(value)
            protected = sinks + max(recent, 1)
            if value >= protected:
                continue
            if not relative:
                why = f"sinks + max(recent, 1) = {protected} tokens are protected"
                problems.append((at, f"must be at least {protected} ({why}), got {value}",
                                 self._protection_fixes(at, value)))
            else:
                message = (f"at a budget of {value}, sinks {_show_protection(self.sinks)} and recent "
                           f"{_show_protection(self.recent)} protect {sinks} + max({recent}, 1) = {protected} tokens")
                problems.append((at, f"cannot hold the protected tokens: {message}",
                                 [(("sinks",), f"protects too much: {message}"),
                                  (("recent",), f"protects too much: {message}")]))
        return problems

    def _budget_places(self) -> list[tuple[tuple, int]]:
        """``(field, tokens)`` of each written budget: the integer, each point of a schedule, a ratio's floor."""
        if isinstance(self.budget, list):
            return [(("budget", i), b) for i, b in enumerate(self.budget)]
        if isinstance(self.budget, RatioBudget):
            return [(("budget", "floor"), self.budget.floor)]
        return [(("budget",), self.budget)]

    def _protection_fixes(self, at: tuple, budget: int) -> list[tuple[tuple, str | None]]:
        """For integer protections that overflow ``budget`` (written at ``at``): what ``recent`` and ``sinks``
        would each have to be, where changing that field alone would fix it (else ``None``)."""
        sinks, recent = self.sinks, self.recent
        place = "the budget" if at == ("budget",) else "the budget's floor" if at[-1] == "floor" \
            else f"budget[{at[-1]}] ="
        room_recent, room_sinks = budget - sinks, budget - max(recent, 1)
        return [
            (("recent",), f"must be at most {room_recent} ({place} {budget} minus sinks {sinks}), got {recent}"
             if recent >= 1 and room_recent >= 1 else None),
            (("sinks",), f"must be at most {room_sinks} ({place} {budget} minus max(recent, 1) = {max(recent, 1)}), "
                         f"got {sinks}" if sinks >= 1 and room_sinks >= 0 else None),
        ]

    def protections_for(self, budget: int | RatioBudget) -> tuple[int, int]:
        """``(sinks, recent)`` in tokens for a layer whose budget is ``budget`` (a ratio budget: its floor)."""
        tokens = budget.floor if isinstance(budget, RatioBudget) else budget
        return protected_tokens(self.sinks, tokens), protected_tokens(self.recent, tokens)

    def layer_budget_minimums(self) -> list[int]:
        if isinstance(self.budget, list):
            return list(self.budget)
        return [self.budget.minimum() if isinstance(self.budget, RatioBudget) else self.budget]

    def budget_for_layer(self, layer_idx: int, num_layers: int) -> int | RatioBudget:
        """This layer's budget. A list of ``n`` points is spread evenly from layer 0 to the last layer and
        interpolated linearly in between (rounded to the nearest token); a list as long as the model has
        layers gives each layer its own budget, a single point gives every layer the same."""
        if not isinstance(self.budget, list):
            return self.budget
        return interpolate(self.budget, layer_idx, num_layers)

    def problems_for_model(self, num_layers: int) -> list[str]:
        """What this decode policy asks that a model of ``num_layers`` layers cannot do (empty: nothing)."""
        return [
            f"decode.uncompressed_layers[{i}]: layer {layer} does not exist, the model has {num_layers} layers"
            for i, layer in enumerate(self.uncompressed_layers)
            if layer >= num_layers
        ]


#: Unicode categories a name may not hold: controls (NUL, escape, tab, line feed, NEL...), surrogates, line and
#: paragraph separators.
_NOT_IN_A_NAME = frozenset({"Cc", "Cs", "Zl", "Zp"})


class Policy(_Frozen):
    """A complete policy: what the prompt keeps, and how the generated tokens are held to a budget."""

    name: str = Field(
        "custom", min_length=1, max_length=200,
        description="Short name shown in stats and reports (one line of printable text).",
    )
    description: str = Field("", description="What the policy does.")
    prefill: PrefillItem = Field(
        default_factory=KeepAll, description="Prefill compressor; keep (default) leaves the prompt intact."
    )
    decode: DecodePolicy | None = Field(None, description="Decode-time eviction; null keeps every generated token.")

    @field_validator("name")
    @classmethod
    def _one_printable_line(cls, value: str) -> str:
        # A name lands in logs, tables, file names and terminals: a NUL truncates it in C APIs, an escape
        # sequence recolours a terminal, a line break splits a report's row.
        for i, char in enumerate(value):
            if unicodedata.category(char) in _NOT_IN_A_NAME:
                raise ValueError(f"must be one line of printable text: control character U+{ord(char):04X} at "
                                 f"position {i}")
        return value

    @field_validator("prefill", mode="before")
    @classmethod
    def _default_prefill(cls, value):
        return KeepAll() if value is None else value

    @property
    def evicts(self) -> bool:
        """Whether this policy ever removes a token (otherwise the cache equals the full cache)."""
        return self.decode is not None or self.prefill.type != "keep"

    def problems_for_model(self, num_layers: int) -> list[str]:
        """What this policy asks that a model of ``num_layers`` layers cannot do (empty: nothing)."""
        return [] if self.decode is None else self.decode.problems_for_model(num_layers)
