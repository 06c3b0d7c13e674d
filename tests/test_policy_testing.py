"""momentkv.testing: the invariants hold for the built-ins and drawn policies, and the checks do catch faults."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from momentkv import DecodePolicy, load_policy, testing
from momentkv.policy import BudgetFraction, builtin_policy_names

_SMALL = {"decode": {"budget": 6, "sinks": 1, "recent": 2, "scorers": ["ema"]}}
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
@given(policy=testing.policies(decode=True), trace=testing.decode_traces(max_steps=32))
def test_drawn_policies_keep_their_promises(policy, trace):
    testing.check_invariants(policy, trace, num_layers=2)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(decode=True, prefill=True), trace=testing.decode_traces(max_steps=24))
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
        testing._compare_with_full(faked)
