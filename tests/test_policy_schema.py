"""The policy schema: built-ins, budgets, cross-field rules, the scorer registry, Python construction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from pydantic import Field, ValidationError

import momentkv
from momentkv import DecodePolicy, Policy, PolicyError, RatioBudget, load_policy, testing
from momentkv.core.plan import build_plans
from momentkv.policy import BudgetFraction, builtin_policy_names, dump_policy, loads_policy, summarize
from momentkv.scoring import EMA, Recency, scorer_class, scorer_names


@pytest.mark.parametrize("name", builtin_policy_names())
def test_every_builtin_validates_and_round_trips(name):
    policy = load_policy(name)
    assert policy.name == name.removesuffix(".yaml")
    assert loads_policy(dump_policy(policy)) == policy
    assert summarize(policy).startswith(policy.name)


def test_builtin_found_with_or_without_suffix():
    assert load_policy("moment") == load_policy("moment.yaml")


@pytest.mark.parametrize(
    ("points", "layers", "expected"),
    [
        ([256, 128], 5, [256, 224, 192, 160, 128]),
        ([64], 3, [64, 64, 64]),
        ([10, 20, 30], 3, [10, 20, 30]),
        ([100, 50, 100], 5, [100, 75, 50, 75, 100]),
        ([8, 16], 1, [8]),
    ],
)
def test_layer_schedule_interpolates_linearly(points, layers, expected):
    decode = DecodePolicy(budget=points, scorers=[EMA()])
    assert [decode.budget_for_layer(i, layers) for i in range(layers)] == expected
    plans = build_plans(Policy(decode=decode), layers, [None] * layers)
    assert [p.budget for p in plans] == expected


def test_ratio_budget_grows_between_floor_and_cap():
    budget = RatioBudget(ratio=0.25, floor=4, cap=10)
    assert [budget.tokens(n) for n in (0, 16, 17, 36, 1000)] == [4, 4, 5, 9, 10]


def test_uncompressed_layers_keep_everything():
    policy = Policy(decode=DecodePolicy(budget=8, uncompressed_layers=[1], scorers=[EMA()]))
    assert [p.budget for p in build_plans(policy, 3, [None] * 3)] == [8, None, 8]
    assert policy.problems_for_model(3) == []
    assert policy.problems_for_model(1) == [
        "decode.uncompressed_layers[0]: layer 1 does not exist, the model has 1 layers"
    ]


@pytest.mark.parametrize(
    ("decode", "path", "fragment"),
    [
        ({"budget": 4, "sinks": 2, "recent": 3}, "decode.budget", "must be at least 5"),
        ({"budget": 1, "sinks": 1}, "decode.budget", "must be at least 2"),
        ({"budget": [8, 3], "recent": 4}, "decode.budget[1]", "must be at least 4"),
        ({"budget": {"ratio": 0.5, "floor": 2}, "recent": 4}, "decode.budget.floor", "must be at least 4"),
        ({"budget": {"ratio": 0.5, "floor": 8, "cap": 4}}, "decode.budget.cap", "must be at least floor (8)"),
        ({"budget": 4, "cadence": 5}, "decode.cadence", "at most the smallest budget (4)"),
        ({"budget": 8, "uncompressed_layers": [2, 0, 2]}, "decode.uncompressed_layers[2]", "already listed at [0]"),
        ({"budget": 8, "scorers": [{"type": "ema", "weight": 0.0}]}, "decode.scorers", "non-zero weight"),
        ({"budget": 8, "scorers": [{"type": "ema", "weight": float("nan")}]}, "decode.scorers[0].weight", "finite"),
        ({"budget": 8, "scorers": [{"type": "ema", "normalize": "softmax"}]}, "decode.scorers[0].normalize",
         "must be 'none', 'sum', 'max', 'zscore' or 'rank'"),
        ({"budget": "128"}, "decode.budget", "must be an integer, a {ratio, floor, cap} mapping"),
        ({"budget": 8, "sinks": True}, "decode.sinks", "must be an integer (tokens) or {fraction: f}"),
        ({"budget": 8, "recent": 4.0}, "decode.recent", "must be an integer, got 4.0"),
        ({"budget": 8, "recent": {"fraction": 1.5}}, "decode.recent.fraction", "must be in [0, 1], got 1.5"),
        ({"budget": 8, "recent": {"fraction": 0.5, "share": 1}}, "decode.recent.share", "unknown field"),
        ({"budget": 8, "sinks": {"fraction": 0.5}, "recent": {"fraction": 0.75}}, "decode.recent.fraction",
         "add up to 1.25"),
        ({"budget": 8, "sinks": 4, "recent": {"fraction": 1.0}}, "decode.budget",
         "at a budget of 8, sinks 4 and recent {fraction: 1} protect 4 + max(8, 1) = 12 tokens"),
        ({"budget": [64, 6], "sinks": 4, "recent": {"fraction": 0.5}}, "decode.budget[1]", "protect 4 + max(3, 1)"),
        ({"budget": 8, "scorers": []}, "decode.scorers", "at least 1 item"),
    ],
)
def test_rules_name_the_field(decode, path, fragment):
    data = {"decode": {"scorers": ["ema"], **decode}}
    with pytest.raises(PolicyError) as info:
        load_policy(data)
    assert [d.path for d in info.value.details] == [path], info.value.problems
    assert fragment in info.value.details[0].message


def test_normalize_values_all_accepted():
    for how in ("none", "sum", "max", "zscore", "rank"):
        assert EMA(normalize=how).normalize == how


def test_models_are_frozen_and_forbid_unknown_fields():
    policy = load_policy("moment.yaml")
    with pytest.raises(ValidationError):
        policy.name = "other"
    with pytest.raises(ValidationError):
        EMA(alpah=0.5)


def test_python_api_builds_what_yaml_describes():
    built = Policy(
        name="moment",
        description=load_policy("moment").description,
        decode=DecodePolicy(budget=128, scorers=[EMA(alpha=0.9, bias_correction=True, normalize="rank"),
                                                 Recency(weight=1.0, normalize="rank")]),
    )
    assert built == load_policy("moment.yaml")
    assert DecodePolicy(budget=(4, 8), uncompressed_layers=(1,), scorers=(Recency(),)).budget == [4, 8]


def test_registered_scorer_is_named_by_yaml_and_scored_by_the_layer():
    @momentkv.register_scorer("test_schema_oldest")
    class Oldest(momentkv.Scorer):
        """Keeps the oldest tokens: ``age * strength``."""

        needs_attention = False
        strength: float = Field(1.0, gt=0.0)

        def update(self, ctx):
            return ctx.age * self.strength

    assert "test_schema_oldest" in scorer_names()
    assert scorer_class("test_schema_oldest") is Oldest
    policy = loads_policy("decode:\n  budget: 4\n  scorers:\n    - {type: test_schema_oldest, strength: 2.0}\n")
    assert policy.decode.scorers == [Oldest(strength=2.0)]
    assert loads_policy(dump_policy(policy)) == policy
    with pytest.raises(PolicyError) as info:
        loads_policy("decode:\n  budget: 4\n  scorers:\n    - {type: test_schema_oldest, strength: 0}\n", "o.yaml")
    assert info.value.problems == ["o.yaml:4 decode.scorers[0].strength: must be > 0, got 0"]

    # The layer keeps the oldest generated tokens (besides the newest, always kept) with this scorer.
    trace = testing.DecodeTrace(seed=3, batch=1, kv_heads=2, head_dim=4, prompt_len=3, steps=10,
                                sharpness=(1.0,) * 10)
    run = testing.run_trace(policy, trace)
    kept = sorted(run.records[-1].positions[0, 0].tolist())
    assert kept == [0, 1, 2, 3, 4, 5, 12]


def test_unregistered_scorer_instance_is_refused():
    class Loose(momentkv.Scorer):
        type: str = "loose"

        def update(self, ctx):
            return ctx.age

    with pytest.raises(ValidationError, match="not the scorer registered"):
        DecodePolicy(budget=4, scorers=[Loose()])


def test_register_scorer_refuses_name_clash_and_non_scorers():
    with pytest.raises(ValueError, match="already registered"):
        momentkv.register_scorer("ema")(type("Other", (momentkv.Scorer,), {"__annotations__": {}}))
    with pytest.raises(TypeError):
        momentkv.register_scorer("test_schema_not_a_scorer")(int)


def test_policy_with_an_error_never_reaches_the_model():
    from tests.models import tiny_model

    model = tiny_model()
    before = (model.config._attn_implementation, model.generate)
    with pytest.raises(PolicyError):
        momentkv.patch(model, {"decode": {"budget": 2, "recent": 4, "scorers": ["ema"]}})
    assert (model.config._attn_implementation, model.generate) == before
    assert momentkv.handle_of(model) is None
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_relative_protections_follow_each_layer_budget():
    decode = DecodePolicy(budget=[64, 16], sinks=2, recent={"fraction": 0.5}, scorers=[EMA()])
    assert decode.protections_for(64) == (2, 32)
    assert decode.protections_for(RatioBudget(ratio=0.5, floor=10)) == (2, 5)  # a ratio budget: its floor
    plans = build_plans(Policy(decode=decode), 4, [None] * 4)
    assert [(p.budget, p.sinks, p.recent) for p in plans] == [(64, 2, 32), (48, 2, 24), (32, 2, 16), (16, 2, 8)]
    assert [p.sinks + max(p.recent, 1) <= p.budget for p in plans] == [True] * 4
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 tokens
    assert DecodePolicy(budget=100, recent={"fraction": 0.29}, scorers=[EMA()]).protections_for(100) == (0, 29)


def test_h2o_keeps_half_of_any_budget_it_is_extended_with():
    """extends: h2o.yaml with a smaller budget stays H2O (half heavy hitters, half recent), not recency."""
    for budget in (8, 64, 128, 1000):
        policy = loads_policy(f"extends: h2o.yaml\ndecode:\n  budget: {budget}\n")
        (plan,) = build_plans(policy, 1, [None])
        assert (plan.budget, plan.sinks, plan.recent) == (budget, 0, budget // 2)
    scope = load_policy("scope.yaml")
    assert scope.decode.protections_for(scope.decode.budget) == (0, 32)


@pytest.mark.parametrize("name", builtin_policy_names())
def test_no_builtin_protects_its_whole_budget(name):
    """A built-in whose protections swallow (nearly) its budget would rank nothing: keep room to rank."""
    decode = load_policy(name).decode
    if decode is None:
        return
    for budget in decode.layer_budget_minimums():
        sinks, recent = decode.protections_for(budget)
        assert sinks + recent <= budget // 2, (name, budget, sinks, recent)


@given(sinks=st.one_of(st.integers(0, 8), st.builds(BudgetFraction, fraction=st.floats(0, 1))),
       recent=st.one_of(st.integers(0, 8), st.builds(BudgetFraction, fraction=st.floats(0, 1))),
       points=st.lists(st.integers(1, 80), min_size=1, max_size=4), layers=st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_a_valid_policy_holds_its_protections_in_every_layer(sinks, recent, points, layers):
    """The rules check the written budgets only; every interpolated layer budget then holds the protections."""
    try:
        decode = DecodePolicy(budget=points, sinks=sinks, recent=recent, scorers=[EMA()])
    except ValidationError:
        return
    for plan in build_plans(Policy(decode=decode), layers, [None] * layers):
        assert plan.sinks + max(plan.recent, 1) <= plan.budget, (decode, plan)


def test_the_strategies_draw_every_decode_form():
    """The property tests only prove what the strategies draw: relative protections and every budget form."""

    def first(strategy, condition):  # the first drawn example that meets the condition (no shrinking)
        return find(strategy, condition, settings=settings(phases=[Phase.generate], database=None, max_examples=500))

    drawn = testing.decode_policies()
    first(drawn, lambda d: isinstance(d.recent, BudgetFraction) and isinstance(d.sinks, BudgetFraction))
    first(drawn, lambda d: isinstance(d.sinks, int) and isinstance(d.recent, BudgetFraction))
    first(drawn, lambda d: isinstance(d.budget, RatioBudget) and d.budget.cap is not None)
    first(drawn, lambda d: isinstance(d.budget, list) and len(d.budget) > 1)
