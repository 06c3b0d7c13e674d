"""Property testing for policy authors: Hypothesis strategies and invariant checks on the real cache layer.

A few lines of pytest check that a policy keeps its promises on random decode traces::

    from hypothesis import given, settings
    from momentkv import testing

    @settings(max_examples=25, deadline=None)
    @given(trace=testing.decode_traces())
    def test_my_policy(trace):
        testing.check_invariants("my_policy.yaml", trace)

What is checked (each also available alone, on a :class:`TraceRun` from :func:`run_trace`):

- :func:`check_slots`: every slot holds the key and value of the token its position names, no token twice;
- :func:`check_budget`: the evictable tokens never exceed the budget (``budget + cadence - 1`` between two
  evictions when ``cadence > 1``);
- :func:`check_protected`: the prompt (with ``scope: decode``), the ``sinks`` and the ``recent`` tokens are
  never evicted, and nothing at all is evicted from an uncompressed layer;
- :func:`check_scores`: each scorer, called alone on every step's tokens, returns finite scores shaped
  ``(batch, kv_heads, tokens)`` and modifies nothing in its context but its state; the combined scores are
  never NaN; with ``granularity: layer`` every KV head keeps the same tokens;
- :func:`check_deterministic`: two runs of the same trace give the same cache, bit for bit;
- :func:`check_matches_full_cache`: until the budget is reached, the cache equals the full cache.

The strategies: :func:`policies` (valid policies, built through the Python API, any registered scorer with
parameters drawn from its pydantic fields), :func:`invalid_policies` (policy data with one mistake, and the
field and message that the error must name), :func:`decode_traces` (keys, values and attention rows of
varying length and sharpness).

The traces drive :class:`momentkv.engine.layer.EvictingLayer` itself, the layer ``patch()`` installs: the
prompt through ``update`` and ``observe`` (so prefill compressors and ``scope: all`` see real queries), then
one ``update`` and one ``update_scores`` per generated token, with the attention the trace gives each stored
token. Attention is a function of the token (not of its slot), so two policies see the same attention for the
same token, as they would in a model.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from momentkv.engine.layer import EvictingLayer
from momentkv.engine.plan import LayerPlan, build_plans
from momentkv.policy.annotations import Shape, field_shape
from momentkv.policy.dump import policy_to_data
from momentkv.policy.loader import PolicySource, load_policy
from momentkv.policy.schema import BudgetFraction, DecodePolicy, Policy, RatioBudget
from momentkv.registry import registry_for
from momentkv.prefill.base import KeepAll, PrefillCompressor, prefill_class, prefill_names
from momentkv.scoring import ScoreContext, Scorer, scorer_class, scorer_names

__all__ = [
    "DecodeTrace", "InvalidPolicy", "StepRecord", "TraceRun", "check_budget", "check_deterministic",
    "check_invariants", "check_matches_full_cache", "check_protected", "check_scores", "check_slots",
    "component_params", "decode_policies", "decode_traces", "invalid_policies", "policies", "prefill_compressors",
    "run_trace", "scorers",
]


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
        s, r = (p.tokens(budget) if isinstance(p, BudgetFraction) else p for p in (sinks, recent))
        if budget >= s + max(r, 1):
            return budget
        budget += 1


@st.composite
def decode_policies(draw, scorer_names: list[str] | None = None, max_budget: int = 48, max_scorers: int = 3):
    """Valid :class:`DecodePolicy` objects: every field drawn (protections as tokens or as fractions of the
    budget), cross-field rules respected."""
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
        uncompressed_layers=draw(st.lists(st.integers(0, 7), unique=True, max_size=3)),
        scorers=chosen,
    )


@st.composite
def policies(
    draw, scorer_names: list[str] | None = None, prefill: bool | list[str] = False, decode: bool | None = None,
    max_budget: int = 48,
):
    """Valid :class:`Policy` objects built through the Python API.

    ``prefill``: ``False`` keeps the prompt (``keep``), ``True`` draws any registered compressor, a list draws
    among those names. ``decode``: ``True`` always has a decode policy, ``False`` never, ``None`` mostly.
    """
    if prefill is False:
        compressor = KeepAll()
    else:
        compressor = draw(prefill_compressors(None if prefill is True else list(prefill)))
    has_decode = draw(st.integers(0, 9)) > 0 if decode is None else decode
    name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x85\u2028\u2029")
    return Policy(
        name=draw(st.text(name_chars, min_size=1, max_size=20)),
        description=draw(st.text(max_size=40)),
        prefill=compressor,
        decode=draw(decode_policies(scorer_names, max_budget)) if has_decode else None,
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
        layer = draw(st.integers(0, 7))
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


# ----------------------------------------------------------------- decode traces
@dataclass(eq=False)
class DecodeTrace:
    """A prompt and ``steps`` generated tokens for one cache layer, with the attention each step gives.

    ``keys``/``values``: ``(batch, kv_heads, prompt_len + steps, head_dim)``, token ``t``'s key at index ``t``.
    ``queries``: ``(batch, kv_heads, prompt_len, head_dim)``, the prompt's queries (for prefill compressors).
    ``logits``: ``(batch, kv_heads, steps, prompt_len + steps)``, how much step ``t``'s query likes each token;
    ``sharpness[t]`` scales them before the softmax (0: uniform attention, 30: nearly one-hot).
    """

    seed: int
    batch: int
    kv_heads: int
    head_dim: int
    prompt_len: int
    steps: int
    sharpness: tuple[float, ...]
    keys: torch.Tensor = field(init=False, repr=False)
    values: torch.Tensor = field(init=False, repr=False)
    queries: torch.Tensor = field(init=False, repr=False)
    logits: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        b, h, d, total = self.batch, self.kv_heads, self.head_dim, self.prompt_len + self.steps
        self.keys = torch.randn((b, h, total, d), generator=g)
        self.values = torch.randn((b, h, total, d), generator=g)
        self.queries = torch.randn((b, h, self.prompt_len, d), generator=g)
        # A few heavy hitters, liked by every step, over per-step noise: the pattern attention scorers exploit.
        heavy = (torch.rand((b, h, 1, total), generator=g) < 0.15).float() * 3.0
        self.logits = torch.randn((b, h, self.steps, total), generator=g) + heavy

    def attention(self, step: int, positions: torch.Tensor) -> torch.Tensor:
        """Step ``step``'s attention ``(batch, kv_heads, S)`` float32 over the stored tokens ``positions``."""
        liked = self.logits[:, :, step].gather(-1, positions) * self.sharpness[step]  # (b, h, S)
        # softmax by hand: torch.softmax parallelises even tiny rows, which is slow on a busy machine
        weights = (liked - liked.amax(-1, keepdim=True)).exp()
        return weights / weights.sum(-1, keepdim=True)


@st.composite
def decode_traces(draw, max_prompt: int = 24, max_steps: int = 48, max_batch: int = 2, max_kv_heads: int = 3):
    """Random :class:`DecodeTrace` objects: shapes, lengths, seeds and per-step sharpness all drawn."""
    steps = draw(st.integers(1, max_steps))
    return DecodeTrace(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, max_batch)),
        kv_heads=draw(st.integers(1, max_kv_heads)),
        head_dim=draw(st.sampled_from([4, 8])),
        prompt_len=draw(st.integers(1, max_prompt)),
        steps=steps,
        sharpness=tuple(draw(st.lists(
            st.one_of(st.just(0.0), st.floats(0.1, 30.0)), min_size=steps, max_size=steps))),
    )


# ----------------------------------------------------------------- running a trace through the cache layer
@dataclass
class StepRecord:
    """The layer after one decode step: ``generated`` tokens so far, and its per-slot tensors (copies)."""

    generated: int
    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor | None


@dataclass
class TraceRun:
    """A policy's plan for one layer, the trace, and the layer after the prompt and after every step."""

    policy: Policy
    plan: LayerPlan
    trace: DecodeTrace
    records: list[StepRecord]
    prompt: StepRecord


def _snapshot(layer: EvictingLayer, generated: int) -> StepRecord:
    scores = layer.scores.clone() if layer.scores is not None else None
    return StepRecord(generated, layer.positions.clone(), layer.keys.clone(), layer.values.clone(), scores)


def run_trace(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> TraceRun:
    """Feed ``trace`` through the cache layer ``policy`` plans for layer ``layer_idx`` of ``num_layers``."""
    policy = load_policy(policy)
    plan = build_plans(policy, num_layers, [None] * num_layers)[layer_idx]
    layer = EvictingLayer(plan)
    p = trace.prompt_len
    layer.update(trace.keys[:, :, :p], trace.values[:, :, :p])
    layer.observe(trace.queries, layer.keys, None, trace.head_dim**-0.5)
    prompt = _snapshot(layer, 0)
    records = []
    for step in range(trace.steps):
        t = p + step
        layer.update(trace.keys[:, :, t : t + 1], trace.values[:, :, t : t + 1])
        if plan.budget is not None:
            layer.update_scores(trace.attention(step, layer.positions) if plan.needs_attention else None)
        records.append(_snapshot(layer, step + 1))
    return TraceRun(policy, plan, trace, records, prompt)


def _fail(run: TraceRun, record: StepRecord | None, message: str):
    where = f"after {record.generated} generated tokens" if record is not None else ""
    raise AssertionError(f"policy {run.policy.name!r}, layer {run.plan.layer_idx}, {where}: {message}\n{run.trace}")


def _present(record: StepRecord, wanted: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, len(wanted))`` bool: whether each wanted position is stored in each head."""
    return (record.positions.unsqueeze(-1) == wanted.view(1, 1, 1, -1)).any(dim=-2)


def check_slots(run: TraceRun) -> None:
    """Each slot holds exactly the key and value of the token its position names; no token is stored twice."""
    trace = run.trace
    for record in [run.prompt, *run.records]:
        seen = trace.prompt_len + record.generated
        pos = record.positions
        if bool((pos < 0).any()) or bool((pos >= seen).any()):
            _fail(run, record, f"a slot names a token that was not fed: {pos.tolist()}")
        ordered = pos.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            _fail(run, record, "a token is stored twice in one head")
        index = pos.unsqueeze(-1).expand(-1, -1, -1, trace.head_dim)
        if not torch.equal(record.keys, trace.keys.gather(2, index)):
            _fail(run, record, "a slot's key is not the key of the token its position names")
        if not torch.equal(record.values, trace.values.gather(2, index)):
            _fail(run, record, "a slot's value is not the value of the token its position names")


def _evictable(run: TraceRun, record: StepRecord) -> torch.Tensor:
    """Evictable tokens stored per (batch, kv head)."""
    if run.plan.scope == "all":
        return torch.full(record.positions.shape[:2], record.positions.shape[-1])
    return (record.positions >= run.trace.prompt_len).sum(-1)


def check_budget(run: TraceRun) -> None:
    """The evictable tokens never exceed the budget (``+ cadence - 1`` between evictions)."""
    plan = run.plan
    if plan.budget is None:
        return
    for record in run.records:
        bound = plan.budget_at(record.generated) + plan.cadence - 1
        held = int(_evictable(run, record).max())
        if held > bound:
            _fail(run, record, f"{held} evictable tokens stored, budget {plan.budget_at(record.generated)} "
                               f"(cadence {plan.cadence}) allows {bound}")


def check_protected(run: TraceRun) -> None:
    """The prompt (scope decode), the sinks and the recent tokens are never evicted; nothing is evicted from a
    layer without budget."""
    plan, trace, p = run.plan, run.trace, run.trace.prompt_len
    keep_prompt = run.policy.prefill.type == "keep"
    for record in run.records:
        seen = p + record.generated
        if plan.budget is None:
            wanted = torch.arange(seen) if keep_prompt else torch.arange(p, seen)
            what = "a token (the layer has no budget)"
        else:
            parts = [torch.arange(p, p + min(plan.sinks, record.generated))]  # sinks: the first generated
            # recent, the newest included; prompt tokens a prefill compressor dropped cannot be among them
            parts.append(torch.arange(max(0 if keep_prompt else p, seen - max(plan.recent, 1)), seen))
            if plan.scope == "decode" and keep_prompt:
                parts.append(torch.arange(p))
            wanted = torch.cat(parts).unique()
            what = "a protected token (prompt, sink or recent)"
        present = _present(record, wanted)
        if not bool(present.all()):
            missing = wanted[~present.all(dim=(0, 1))].tolist()
            _fail(run, record, f"{what} was evicted: positions {missing}")
        if plan.scope == "decode" and not keep_prompt:
            if not torch.equal(_prompt_kept(record, p), _prompt_kept(run.records[0], p)):
                _fail(run, record, "the prompt tokens kept by the prefill compressor changed during decoding")


def _prompt_kept(record: StepRecord, prompt_len: int) -> torch.Tensor:
    """The prompt positions stored in each head, ascending, with the other slots as ``prompt_len`` at the end."""
    return record.positions.clamp(max=prompt_len).sort(-1).values[..., : int((record.positions < prompt_len).sum(-1).max()) + 1]


def check_scores(run: TraceRun) -> None:
    """Every scorer returns finite scores of the right shape and leaves its context alone; the combined scores
    are never NaN; with ``granularity: layer`` every KV head of a row keeps the same tokens.

    Each scorer is called on its own (:func:`_check_each_scorer`), so a scorer whose NaN or wrongly shaped
    output a normalisation or another scorer's sum would hide is still caught, and named.
    """
    for record in run.records:
        if record.scores is not None and bool(torch.isnan(record.scores).any()):
            _fail(run, record, "a score is NaN")
        if run.plan.granularity == "layer" and run.plan.budget is not None and run.policy.prefill.type == "keep":
            generated = record.positions.masked_fill(record.positions < run.trace.prompt_len, -1).sort(-1).values
            if not bool((generated == generated[:, :1]).all()):
                _fail(run, record, "granularity: layer, yet the KV heads keep different tokens")
    _check_each_scorer(run)


def _evictable_slots(run: TraceRun, record: StepRecord) -> torch.Tensor:
    """``(batch, kv_heads, tokens)`` int64: the slots of the evictable tokens, in slot order."""
    positions = record.positions
    if run.plan.scope == "all":
        return torch.arange(positions.shape[-1]).expand(positions.shape).contiguous()
    evictable = positions >= run.trace.prompt_len
    counts = evictable.sum(-1)
    if not bool((counts == counts.flatten()[0]).all()):
        _fail(run, record, f"the KV heads hold different numbers of evictable tokens: {counts.tolist()}")
    order = torch.sort((~evictable).to(torch.int8), dim=-1, stable=True).indices  # evictable slots first
    return order[..., : int(counts.flatten()[0])]


def _window_of(trace: DecodeTrace, step: int, positions: torch.Tensor, slots: torch.Tensor, limit: int):
    """``ScoreContext.window_attention`` for a trace: the attention of the last queries (at most ``limit``),
    each over the stored tokens at or before its own position, restricted to ``slots``."""

    def window_attention(window: int) -> torch.Tensor:
        if window > limit:
            raise ValueError(f"asked for {window} queries, the scorer's query_window() is {limit}")
        rows = []
        for past in range(max(0, step - window + 1), step + 1):
            liked = trace.logits[:, :, past].gather(-1, positions) * trace.sharpness[past]  # (b, h, S)
            liked = liked.masked_fill(positions > trace.prompt_len + past, float("-inf"))
            rows.append(torch.softmax(liked, dim=-1).nan_to_num(0.0).gather(-1, slots))  # (b, h, T)
        return torch.stack(rows, dim=2).unsqueeze(2)  # (b, h, groups = 1, w, T)

    return window_attention


def _check_each_scorer(run: TraceRun) -> None:
    """Replay the run's steps through each scorer alone, on a :class:`~momentkv.scoring.ScoreContext` built from
    the trace: the tokens the layer kept after each step, the trace's attention, and per-token state that
    follows each token (new tokens start at 0). Each call must return ``(batch, kv_heads, tokens)`` finite
    scores and modify no tensor of the context but ``state``."""
    plan, trace = run.plan, run.trace
    if plan.budget is None:
        return
    total = trace.prompt_len + trace.steps
    # per scorer, its state for every token of the trace: (channels, batch, kv_heads, total positions)
    memories = [torch.zeros((scorer.state_channels, trace.batch, trace.kv_heads, total)) for scorer in plan.scorers]
    for step, record in enumerate(run.records):
        slots = _evictable_slots(run, record)  # (b, h, T)
        positions = record.positions.gather(-1, slots)  # (b, h, T)
        index = positions.unsqueeze(-1).expand(-1, -1, -1, trace.head_dim)
        keys, values = trace.keys.gather(2, index), trace.values.gather(2, index)  # (b, h, T, d)
        attention = trace.attention(step, record.positions).gather(-1, slots)  # (b, h, T)
        for scorer, memory in zip(plan.scorers, memories):
            channels = memory.shape[0]
            state = memory.gather(-1, positions.unsqueeze(0).expand(channels, -1, -1, -1))  # (C, b, h, T)
            state = state[0] if channels == 1 else state
            window = _window_of(trace, step, record.positions, slots, scorer.query_window()) \
                if scorer.query_window() else None
            ctx = ScoreContext(
                attention=attention.clone() if scorer.needs_attention else None, keys=keys.clone(),
                values=values.clone(), state=state, positions=positions.clone(), now=trace.prompt_len + step,
                layer_idx=plan.layer_idx, num_layers=plan.num_layers, window=window,
            )
            out = scorer.update(ctx)
            what = f"scorer {scorer.type!r}"
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(positions.shape):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                _fail(run, record, f"{what} returned {got}, not (batch, kv_heads, tokens) = {tuple(positions.shape)}")
            if not bool(torch.isfinite(out).all()):
                _fail(run, record, f"{what} returned a score that is NaN or infinite")
            for name, seen, given in (("attention", ctx.attention, attention), ("keys", ctx.keys, keys),
                                      ("values", ctx.values, values), ("positions", ctx.positions, positions)):
                if seen is not None and not torch.equal(seen, given):
                    _fail(run, record, f"{what} modified ctx.{name}; a scorer may modify only ctx.state")
            written = ctx.state if channels > 1 else ctx.state.unsqueeze(0)
            memory.scatter_(-1, positions.unsqueeze(0).expand(channels, -1, -1, -1), written)


def _same_records(a: list[StepRecord], b: list[StepRecord]) -> int | None:
    """The first step at which two runs differ, or ``None``."""
    for i, (x, y) in enumerate(zip(a, b)):
        if not (torch.equal(x.positions, y.positions) and torch.equal(x.keys, y.keys)
                and torch.equal(x.values, y.values)):
            return i
    return None


def _compare_runs(first: TraceRun, second: TraceRun) -> None:
    step = _same_records(first.records, second.records)
    if step is not None:
        _fail(first, first.records[step], "a second run of the same trace kept different tokens")
    for x, y in zip(first.records, second.records):
        if (x.scores is None) != (y.scores is None) or (
            x.scores is not None and not torch.equal(x.scores, y.scores)
        ):
            _fail(first, x, "a second run of the same trace computed different scores")


def check_deterministic(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> None:
    """Two runs of the same trace keep the same tokens in the same slots, with equal scores."""
    _compare_runs(run_trace(policy, trace, layer_idx, num_layers), run_trace(policy, trace, layer_idx, num_layers))


def _compare_with_full(run: TraceRun) -> int:
    full_policy = run.policy.model_copy(update={"decode": None})
    full = run_trace(full_policy, run.trace, run.plan.layer_idx, run.plan.num_layers)
    compared = []
    for mine, reference in zip(run.records, full.records):
        budget = run.plan.budget_at(mine.generated)
        if budget is not None and int(_evictable(run, reference).max()) > budget:
            break
        compared.append((mine, reference))
    step = _same_records([m for m, _ in compared], [r for _, r in compared])
    if step is not None:
        _fail(run, compared[step][0], "the cache differs from the full cache although the budget was not reached")
    return len(compared)


def check_matches_full_cache(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> int:
    """Until the budget is first reached, the cache equals the full cache (same prefill, no decode eviction).

    Returns how many steps were compared (0 when the budget is reached at the first step).
    """
    return _compare_with_full(run_trace(policy, trace, layer_idx, num_layers))


def check_invariants(policy: PolicySource, trace: DecodeTrace, num_layers: int = 4) -> None:
    """Every check above, on every layer of a ``num_layers``-layer model (schedules, uncompressed layers)."""
    policy = load_policy(policy)
    for layer_idx in range(num_layers):
        run = run_trace(policy, trace, layer_idx, num_layers)
        check_slots(run)
        check_budget(run)
        check_protected(run)
        check_scores(run)
        _compare_runs(run, run_trace(policy, trace, layer_idx, num_layers))
        _compare_with_full(run)
