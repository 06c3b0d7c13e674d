"""The Python API and YAML are one language: load(dump(p)) == p for Hypothesis-drawn policies."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from momentkv import PolicyError, load_policy, testing
from momentkv.policy import dump_policy, loads_policy, policy_to_data
from momentkv.prefill import PyramidKV


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(prefill=True))
def test_dump_then_load_gives_the_same_policy(policy):
    text = dump_policy(policy)
    assert "extends" not in text
    assert loads_policy(text) == policy
    assert load_policy(policy_to_data(policy)) == policy


@pytest.mark.parametrize("text", ["0E0", "1e-6", "-.5", ".5e3", "+2E+1", "1.0", "12", "null", "yes", "~", "0o7",
                                  "0x1F", "064", "08", "-010", ".NaN", "+.inf", "1_000", "1:30", "TRUE", "NULL"])
def test_text_that_reads_as_a_number_is_quoted_in_the_dump(text):
    """The loader reads YAML 1.2's core schema (``1e-6``, ``0o7``; ``08`` refused), and YAML 1.1 tools read
    ``yes`` and ``1_000`` as values: a description spelled like any of them must come back as text."""
    policy = loads_policy(f"name: p\ndescription: '{text}'\n")
    assert policy.description == text
    assert loads_policy(dump_policy(policy)) == policy


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=testing.policies(decode=True))
def test_dump_is_stable(policy):
    text = dump_policy(policy)
    assert dump_policy(loads_policy(text)) == text


def test_a_pyramid_schedule_loads_back_from_its_dump():
    """A schedule replaces the capacity: the dump writes capacity: null beside it, and loads back."""
    policy = loads_policy("prefill: {type: pyramidkv, schedule: [20, 10]}\n")
    assert (policy.prefill.capacity, policy.prefill.schedule) == (None, [20, 10])
    assert loads_policy(dump_policy(policy)) == policy
    assert load_policy(policy_to_data(policy)) == policy
    assert PyramidKV(schedule=(20, 10)) == policy.prefill  # Python API: a tuple is a list
    assert PyramidKV().capacity == 1024 and PyramidKV().schedule is None
    for text, expected in [
        ("prefill: {type: pyramidkv, capacity: 64, schedule: [64, 32]}\n",
         "t.yaml:1 prefill.schedule: give either capacity (a pyramid) or schedule"),
        ("prefill: {type: pyramidkv, capacity: null}\n", "t.yaml:1 prefill.capacity: capacity is null"),
        ("prefill: {type: pyramidkv, schedule: [8, 0]}\n", "t.yaml:1 prefill.schedule[1]: must be >= 1, got 0"),
    ]:
        with pytest.raises(PolicyError) as info:
            loads_policy(text, "t.yaml")
        assert [p for p in info.value.problems if p.startswith(expected)], info.value.problems


def _first(strategy, condition):
    """The first drawn example that meets ``condition`` (no shrinking: only whether one exists matters)."""
    return find(strategy, condition, settings=settings(phases=[Phase.generate], database=None, max_examples=500))


def test_the_strategies_draw_pyramid_schedules():
    """The round trip above only proves what the strategies draw: PyramidKV with a schedule must be among it."""
    compressors = testing.prefill_compressors(["pyramidkv"])
    assert _first(compressors, lambda c: c.schedule is not None and len(c.schedule) > 1).capacity is None
    assert _first(compressors, lambda c: c.schedule is None).capacity is not None
