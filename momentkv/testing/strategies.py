"""Hypothesis strategies: valid policies drawn from the components' fields, and policies with one mistake."""

from __future__ import annotations

import string
from dataclasses import dataclass

from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from momentkv.policy.annotations import Shape, field_shape
from momentkv.policy.dump import policy_to_data
from momentkv.policy.schema import BudgetFraction, DecodePolicy, Policy, RatioBudget, protected_tokens
from momentkv.registry import registry_for
from momentkv.prefill.base import KeepAll, PrefillCompressor, prefill_class, prefill_names
from momentkv.scoring import scorer_class, scorer_names

# ----------------------------------------------------------------- strategies: components from their fields
def _shape_strategy(shape: Shape) -> st.SearchStrategy | None:
    """Values that ``shape`` accepts, within its declared bounds; ``None`` when the kind is not understood."""
    bounds = shape.bounds
    if shape.kind == "union":
        alternatives = [s for s in map(_shape_strategy, shape.options) if s is not None]
        return st.one_of(alternatives) if alternatives else None
    if shape.kind == "none":
        return st.none()
    if shape.kind == "literal":
        return st.sampled_from(shape.choices)
    if shape.kind == "bool":
        return st.booleans()
    if shape.kind == "int":
        low = -64 if bounds.low is None else int(bounds.low[0]) + (not bounds.low[1])
        high = max(low, 64 if bounds.high is None else int(bounds.high[0]) - (not bounds.high[1]))
        return st.integers(low, min(high, low + 256))
    if shape.kind == "float":
        return st.floats(
            min_value=-16.0 if bounds.low is None else bounds.low[0],
            max_value=16.0 if bounds.high is None else bounds.high[0],
            exclude_min=bounds.low is not None and not bounds.low[1],
            exclude_max=bounds.high is not None and not bounds.high[1], allow_nan=False, allow_infinity=False,
        )
    if shape.kind == "str":
        return st.text(string.ascii_letters + string.digits + " _-", max_size=12)
    if shape.kind == "list":
        items = _shape_strategy(shape.item)
        if items is None:
            return None
        low = bounds.min_length or 0
        return st.lists(items, min_size=low, max_size=max(low, min(bounds.max_length or 6, 6)))
    if shape.kind == "model" and registry_for(shape.model) is None:
        model = shape.model
        return component_params(model, skip=()).map(lambda params: _build(model, params)).filter(
            lambda built: built is not None)
    return None


def component_params(cls: type[BaseModel], skip: tuple[str, ...] = ("type",)) -> st.SearchStrategy[dict]:
    """Parameters for a component class (a scorer, a compressor), drawn from its fields' types and bounds.

    A field whose type is not understood keeps its default; each understood field is sometimes left out, so
    defaults are exercised too.
    """
    fields = {}
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        values = _shape_strategy(field_shape(info))
        if values is not None:
            fields[name] = values if info.is_required() else st.one_of(st.nothing(), values)
    return st.fixed_dictionaries({}, optional=fields) if fields else st.just({})


def _build(cls: type[BaseModel], params: dict):
    try:
        return cls(**params)
    except ValidationError:  # a cross-field rule of the component rejected the draw
        return None


def scorers(names: list[str] | None = None, weights: st.SearchStrategy[float] | None = None) -> st.SearchStrategy:
    """Scorers of the registered types ``names`` (default: all registered), with drawn parameters."""
    weights = weights or st.one_of(st.just(1.0), st.floats(-4.0, 4.0, allow_nan=False))

    @st.composite
    def draw_one(draw):
        name = draw(st.sampled_from(sorted(names or scorer_names())))
        cls = scorer_class(name)
        params = draw(component_params(cls, skip=("type", "weight")))
        params["weight"] = draw(weights)
        built = _build(cls, params)
        return built if built is not None else cls(weight=params["weight"])

    return draw_one()


def prefill_compressors(names: list[str] | None = None) -> st.SearchStrategy[PrefillCompressor]:
    """Prefill compressors of the registered types ``names`` (default: all), with drawn parameters."""

    @st.composite
    def draw_one(draw):
        cls = prefill_class(draw(st.sampled_from(sorted(names or prefill_names()))))
        built = _build(cls, draw(component_params(cls)))
        return built if built is not None else _build(cls, {}) or KeepAll()

    return draw_one()


@st.composite
def _budgets(draw, protected: int, max_budget: int):
    top = max(protected, max_budget)
    kind = draw(st.sampled_from(["tokens", "ratio", "schedule"]))
    if kind == "tokens":
        return draw(st.integers(protected, top))
    if kind == "schedule":
        return draw(st.lists(st.integers(protected, top), min_size=1, max_size=6))
    floor = draw(st.integers(protected, top))
    cap = draw(st.one_of(st.none(), st.integers(floor, 2 * top)))
    ratio = draw(st.floats(0.0, 1.0, exclude_min=True, allow_nan=False))
    return RatioBudget(ratio=ratio, floor=floor, cap=cap)


@st.composite
def _protections(draw):
    """``(sinks, recent)``: integers, fractions of the budget, or one of each; fractions add up to at most 1
    and leave room beside the sinks (the schema's rules for every budget)."""
    kinds = draw(st.sampled_from([("tokens", "tokens"), ("tokens", "fraction"), ("fraction", "tokens"),
                                  ("fraction", "fraction")]))
    sinks = draw(st.integers(0, 6)) if kinds[0] == "tokens" else BudgetFraction(fraction=draw(st.floats(0.0, 0.25)))
    if kinds[1] == "tokens":
        recent = draw(st.integers(0, 12))
    else:
        room = 1.0 - (sinks.fraction if isinstance(sinks, BudgetFraction) else 0.0)
        recent = BudgetFraction(fraction=draw(st.floats(0.0, min(room, 0.75))))
    return sinks, recent


def _smallest_budget(sinks, recent) -> int:
    """The smallest budget that holds these protections (they grow with the budget when relative)."""
    budget = 1
    while True:
        s, r = (protected_tokens(p, budget) for p in (sinks, recent))
        if budget >= s + max(r, 1):
            return budget
        budget += 1


def _check_layers(num_layers: int) -> None:
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers!r}")


@st.composite
def decode_policies(draw, scorer_names: list[str] | None = None, max_budget: int = 48, max_scorers: int = 3,
                    num_layers: int = 4):
    """Valid :class:`DecodePolicy` objects for a model of ``num_layers`` layers: every field drawn
    (protections as tokens or as fractions of the budget), cross-field rules respected, and
    ``uncompressed_layers`` among the model's layers (``0 .. num_layers - 1``)."""
    _check_layers(num_layers)
    sinks, recent = draw(_protections())
    budget = draw(_budgets(_smallest_budget(sinks, recent), max_budget))
    smallest = min(budget) if isinstance(budget, list) else budget.floor if isinstance(budget, RatioBudget) else budget
    chosen = draw(
        st.lists(scorers(scorer_names), min_size=1, max_size=max_scorers).filter(
            lambda items: any(s.weight != 0 for s in items)
        )
    )
    return DecodePolicy(
        budget=budget,
        sinks=sinks,
        recent=recent,
        cadence=draw(st.integers(1, min(smallest, 8))),
        granularity=draw(st.sampled_from(["head", "layer"])),
        scope=draw(st.sampled_from(["decode", "all"])),
        uncompressed_layers=draw(st.lists(st.integers(0, num_layers - 1), unique=True,
                                          max_size=min(3, num_layers))),
        scorers=chosen,
    )


def policies(
    scorer_names: list[str] | None = None, prefill: bool | list[str] = False, decode: bool | None = None,
    max_budget: int = 48, num_layers: int = 4,
) -> st.SearchStrategy[Policy]:
    """Valid :class:`Policy` objects built through the Python API, for a model of ``num_layers`` layers.

    ``prefill``: ``False`` keeps the prompt (``keep``), ``True`` draws any registered compressor, a list draws
    among those names. ``decode``: ``True`` always has a decode policy, ``False`` never, ``None`` mostly.
    ``num_layers``: the layers of the model the policies will run on (default 4, the model
    :func:`~momentkv.testing.check_invariants` builds by default); ``uncompressed_layers`` names only those,
    so every drawn policy passes ``policy.problems_for_model(num_layers)``.
    """
    _check_layers(num_layers)  # here, not at the first draw: a wrong count is the caller's error
    return _policies(scorer_names, prefill, decode, max_budget, num_layers)


@st.composite
def _policies(draw, scorer_names, prefill, decode, max_budget, num_layers):
    if prefill is False:
        compressor = KeepAll()
    else:
        compressor = draw(prefill_compressors(None if prefill is True else list(prefill)))
    has_decode = draw(st.integers(0, 9)) > 0 if decode is None else decode
    name_chars = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))  # a name is one printable line
    return Policy(
        name=draw(st.text(name_chars, min_size=1, max_size=20)),
        description=draw(st.text(max_size=40)),
        prefill=compressor,
        decode=draw(decode_policies(scorer_names, max_budget, num_layers=num_layers)) if has_decode else None,
    )


@dataclass(frozen=True)
class InvalidPolicy:
    """Policy data with one mistake: loading it must raise a problem at ``path`` whose message holds ``expect``."""

    data: dict
    path: str
    expect: str


@st.composite
def invalid_policies(draw):
    """:class:`InvalidPolicy` cases: a valid policy's data with one mistake of one kind."""
    policy = draw(policies(decode=True, scorer_names=["ema", "recency", "accumulated", "instantaneous"]))
    data = policy_to_data(policy)
    decode = data["decode"]
    n = len(decode["scorers"])
    i = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from([
        "negative", "unknown_field", "unknown_scorer", "weight_text", "protected", "cap", "literal", "alpha",
        "duplicate_layer", "empty_name", "budget_bool", "scorer_field", "fraction", "prefill_bool",
    ]))
    if kind == "negative":
        field_name = draw(st.sampled_from(["sinks", "recent"]))
        decode[field_name] = draw(st.integers(-100, -1))
        return InvalidPolicy(data, f"decode.{field_name}", "must be >= 0")
    if kind == "unknown_field":
        key = draw(st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(
            lambda k: k not in DecodePolicy.model_fields))
        decode[key] = 1
        return InvalidPolicy(data, f"decode.{key}", "unknown field")
    if kind == "unknown_scorer":
        decode["scorers"][i] = {"type": "no_such_scorer"}
        return InvalidPolicy(data, f"decode.scorers[{i}].type", "unknown scorer type")
    if kind == "weight_text":
        decode["scorers"][i]["weight"] = draw(st.text(string.ascii_letters, min_size=1, max_size=6))
        return InvalidPolicy(data, f"decode.scorers[{i}].weight", "must be a number")
    if kind == "protected":
        budget = draw(st.integers(1, 16))
        sinks = draw(st.integers(0, budget))  # recent below stays >= 1: the only error is the budget's
        decode.update(budget=budget, sinks=sinks, recent=budget - sinks + draw(st.integers(1, 8)), cadence=1)
        return InvalidPolicy(data, "decode.budget", "must be at least")
    if kind == "cap":
        floor = max(_smallest_budget(policy.decode.sinks, policy.decode.recent), 2)
        decode.update(budget={"ratio": 0.5, "floor": floor, "cap": draw(st.integers(1, floor - 1))}, cadence=1)
        return InvalidPolicy(data, "decode.budget.cap", "must be at least floor")
    if kind == "literal":
        field_name = draw(st.sampled_from(["granularity", "scope"]))
        decode[field_name] = draw(st.sampled_from(["token", "heads", "none", "layers"]))
        return InvalidPolicy(data, f"decode.{field_name}", "must be")
    if kind == "alpha":
        alpha = draw(st.one_of(st.floats(1.0, 1e6, exclude_min=True), st.floats(-1e6, 0.0)))
        decode["scorers"][i] = {"type": "ema", "alpha": alpha}
        return InvalidPolicy(data, f"decode.scorers[{i}].alpha", "must be in (0, 1]")
    if kind == "duplicate_layer":
        layer = draw(st.integers(0, 3))
        decode["uncompressed_layers"] = [layer, layer]
        return InvalidPolicy(data, "decode.uncompressed_layers[1]", "already listed")
    if kind == "empty_name":
        data["name"] = ""
        return InvalidPolicy(data, "name", "must not be empty")
    if kind == "budget_bool":
        decode["budget"] = draw(st.booleans())
        return InvalidPolicy(data, "decode.budget", "must be an integer, a {ratio, floor, cap} mapping")
    if kind == "fraction":
        field_name = draw(st.sampled_from(["sinks", "recent"]))
        fraction = draw(st.one_of(st.floats(1.0, 1e6, exclude_min=True), st.floats(-1e6, 0.0, exclude_max=True)))
        decode[field_name] = {"fraction": fraction}
        return InvalidPolicy(data, f"decode.{field_name}.fraction", "must be in [0, 1]")
    if kind == "prefill_bool":
        field_name = draw(st.sampled_from(["window", "kernel", "capacity"]))
        data["prefill"] = {"type": "snapkv", field_name: draw(st.booleans())}
        return InvalidPolicy(data, f"prefill.{field_name}", "must be an integer")
    # scorer_field: a misspelt parameter
    decode["scorers"][i]["wieght"] = 1.0
    return InvalidPolicy(data, f"decode.scorers[{i}].wieght", "did you mean 'weight'")
