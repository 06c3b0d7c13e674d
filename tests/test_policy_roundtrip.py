"""The Python API and YAML are one language: load(dump(p)) == p for Hypothesis-drawn policies."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from momentkv import load_policy, testing
from momentkv.policy import dump_policy, loads_policy, policy_to_data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(prefill=True))
def test_dump_then_load_gives_the_same_policy(policy):
    text = dump_policy(policy)
    assert "extends" not in text
    assert loads_policy(text) == policy
    assert load_policy(policy_to_data(policy)) == policy


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(decode=True))
def test_dump_is_stable(policy):
    text = dump_policy(policy)
    assert dump_policy(loads_policy(text)) == text
