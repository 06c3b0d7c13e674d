"""momentkv.testing: the invariants hold for the built-ins and drawn policies, and the checks do catch faults."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import momentkv
from momentkv import DecodePolicy, load_policy, testing
from momentkv.testing import checks
from momentkv.policy import BudgetFraction, builtin_policy_names
from momentkv.scoring import scorer_class, scorer_names

_SMALL = {"decode": {"budget": 6, "sinks": 1, "recent": 2, "scorers": ["ema"]}}
# momentkv's own scorers: other test modules register deliberately faulty ones in the same process.
_BUILTIN_SCORERS = [n for n in scorer_names() if scorer_class(n).__module__.startswith("momentkv.")]
_TRACE = testing.DecodeTrace(seed=7, batch=2, kv_heads=2, head_dim=4, prompt_len=5, steps=20,
                             sharpness=tuple(float(i % 4) * 5 for i in range(20)))


@pytest.mark.parametrize("name", builtin_policy_names())
def test_builtins_keep_their_promises(name):
    policy = load_policy(name)
    if policy.decode is not None and not isinstance(policy.decode.budget, list):
        # shrink the budgets so that a short trace reaches them (relative protections follow by themselves)
        sinks, recent = policy.decode.sinks, policy.decode.recent
        decode = policy.decode.model_copy(update={
            "budget": 12, "cadence": min(policy.decode.cadence, 12),
            "sinks": sinks if isinstance(sinks, BudgetFraction) else min(sinks, 2),
            "recent": recent if isinstance(recent, BudgetFraction) else min(recent, 4),
        })
        policy = policy.model_copy(update={"decode": DecodePolicy.model_validate(decode.model_dump())})
    testing.check_invariants(policy, _TRACE, num_layers=2)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(_BUILTIN_SCORERS, decode=True, num_layers=2),
       trace=testing.decode_traces(max_steps=32))
def test_drawn_policies_keep_their_promises(policy, trace):
    testing.check_invariants(policy, trace, num_layers=2)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(_BUILTIN_SCORERS, decode=True, prefill=True, num_layers=2),
       trace=testing.decode_traces(max_steps=24))
def test_drawn_policies_with_prefill_compressors(policy, trace):
    testing.check_invariants(policy, trace, num_layers=2)


def test_budget_is_reached_and_held():
    run = testing.run_trace(_SMALL, _TRACE)
    generated = (run.records[-1].positions >= _TRACE.prompt_len).sum(-1)
    assert generated.tolist() == [[6, 6], [6, 6]]
    assert testing.check_matches_full_cache(_SMALL, _TRACE) == 6


def test_trace_attention_follows_tokens_not_slots():
    positions = torch.tensor([[[0, 3, 1]]]).expand(_TRACE.batch, _TRACE.kv_heads, 3)
    swapped = positions[..., [1, 0, 2]]
    a, b = _TRACE.attention(4, positions), _TRACE.attention(4, swapped)
    assert torch.allclose(a[..., [1, 0, 2]], b)
    assert torch.allclose(a.sum(-1), torch.ones(a.shape[:2]))


def _tamper(run, step, positions):
    records = list(run.records)
    records[step] = dataclasses.replace(records[step], positions=positions)
    return dataclasses.replace(run, records=records)


def test_checks_catch_an_over_budget_layer():
    run = testing.run_trace(_SMALL, _TRACE)
    lenient = dataclasses.replace(run.plan, budget=20)
    testing.check_budget(dataclasses.replace(run, plan=lenient))
    fuller = testing.run_trace({"decode": {"budget": 9, "scorers": ["ema"]}}, _TRACE)
    with pytest.raises(AssertionError, match="evictable tokens stored, budget 6"):
        testing.check_budget(dataclasses.replace(fuller, plan=run.plan))


def test_checks_catch_an_evicted_protected_token():
    run = testing.run_trace(_SMALL, _TRACE)
    last = run.records[-1].positions.clone()
    sink = _TRACE.prompt_len  # the first generated token is the sink
    last[last == sink] = 0  # replace the sink by a duplicate prompt token
    with pytest.raises(AssertionError, match="was evicted"):
        testing.check_protected(_tamper(run, -1, last))
    with pytest.raises(AssertionError, match="stored twice"):
        testing.check_slots(_tamper(run, -1, last))


def test_checks_catch_a_slot_holding_the_wrong_key():
    run = testing.run_trace(_SMALL, _TRACE)
    moved = run.records[3].positions.roll(1, dims=-1)
    with pytest.raises(AssertionError, match="key is not the key"):
        testing.check_slots(_tamper(run, 3, moved))


def test_check_matches_full_cache_catches_early_eviction():
    run = testing.run_trace(_SMALL, _TRACE)
    early = testing.run_trace({"decode": {"budget": 2, "scorers": ["ema"]}}, _TRACE)
    # a plan claiming budget 6 whose cache evicted from 3 tokens on differs from the full cache
    faked = dataclasses.replace(early, plan=run.plan)
    with pytest.raises(AssertionError, match="differs from the full cache"):
        checks._compare_with_full(faked)


class _Flat(momentkv.Scorer):
    """A bug: one score per head, ``(batch, kv_heads, 1)``, which broadcasts silently in a sum."""

    needs_attention = False

    def update(self, ctx):
        return ctx.age[..., :1]


class _NaN(momentkv.Scorer):
    """A bug: NaN for the newest token, which ``normalize: rank`` turns into an ordinary rank."""

    needs_attention = False

    def update(self, ctx):
        return torch.where(ctx.age == 0, float("nan"), -ctx.age)


class _Meddler(momentkv.Scorer):
    """A bug: scales the shared keys in place."""

    needs_attention = False

    def update(self, ctx):
        ctx.keys.mul_(2.0)
        return -ctx.age


@pytest.mark.parametrize(("scorer", "message"), [
    (_Flat(type="flat"), r"scorer 'flat' returned \(2, 2, 1\), not \(batch, kv_heads, tokens\) = \(2, 2, 2\)"),
    (_NaN(type="nan", normalize="rank"), "scorer 'nan' returned a score that is NaN"),
    (_Meddler(type="meddler"), "scorer 'meddler' modified ctx.keys"),
])
def test_check_scores_checks_each_scorer_on_its_own(scorer, message):
    run = testing.run_trace({"decode": {"budget": 6, "scorers": [{"type": "recency"}]}}, _TRACE)
    testing.check_scores(run)
    # the same run, judged as if the plan had the faulty scorer too: check_scores calls each scorer itself
    faulty = dataclasses.replace(run, plan=dataclasses.replace(run.plan, scorers=(*run.plan.scorers, scorer)))
    with pytest.raises(AssertionError, match=message):
        testing.check_scores(faulty)


class _Counter(momentkv.Scorer):
    """Counts its calls in its state: a token's count must be its age + 1 if the state follows the token."""

    needs_attention = False

    def update(self, ctx):
        if not torch.equal(ctx.state, ctx.age):
            raise AssertionError("the state did not follow its token")
        return ctx.state.add_(1.0).clone()


class _Windowed(momentkv.Scorer):
    """Mean attention of the last three queries."""

    def query_window(self):
        return 3

    def update(self, ctx):
        window = ctx.window_attention(3)  # (batch, kv_heads, groups, w, tokens)
        assert window.shape[:3] == (*ctx.keys.shape[:2], 1) and 1 <= window.shape[3] <= 3
        assert window.shape[-1] == ctx.keys.shape[2]
        return window.mean(dim=(2, 3))


class _Greedy(_Windowed):
    """Asks for more queries than its query_window() announced."""

    def update(self, ctx):
        return ctx.window_attention(4).mean(dim=(2, 3))


def test_check_scores_gives_scorers_their_state_and_query_window():
    """The state follows each token from step to step, and a windowed scorer gets the window it announced
    (and no more)."""
    run = testing.run_trace({"decode": {"budget": 6, "recent": 3, "scorers": [{"type": "ema", "alpha": 0.5}]}},
                            _TRACE)
    testing.check_scores(run)
    for scorer in (_Counter(type="counter"), _Windowed(type="windowed")):
        testing.check_scores(dataclasses.replace(run, plan=dataclasses.replace(run.plan, scorers=(scorer,))))
    greedy = dataclasses.replace(run, plan=dataclasses.replace(run.plan, scorers=(_Greedy(type="greedy"),)))
    with pytest.raises(ValueError, match="asked for 4 queries, the scorer's query_window\\(\\) is 3"):
        testing.check_scores(greedy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), layers=st.integers(1, 6))
def test_drawn_policies_name_only_the_layers_the_model_has(data, layers):
    policy = data.draw(testing.policies(decode=True, num_layers=layers))
    assert policy.problems_for_model(layers) == []
    # the default is the 4-layer model check_invariants runs by default
    assert data.draw(testing.policies(decode=True)).problems_for_model(4) == []


@pytest.mark.parametrize("layers", [1, 3])
def test_drawn_policies_reach_the_last_layer(layers):
    last = find(testing.policies(decode=True, num_layers=layers),
                lambda p: layers - 1 in p.decode.uncompressed_layers,
                settings=settings(phases=[Phase.generate], database=None, max_examples=500))
    assert max(last.decode.uncompressed_layers) == layers - 1
    with pytest.raises(ValueError, match="num_layers must be at least 1, got 0"):
        testing.policies(num_layers=0).example()
