"""The fused steady-state scoring step (momentkv/core/fused_scoring.py) and its compiled form (core/compiled.py).

Run eagerly (the native CPU step off; it has its own tests in tests/test_core_native_scoring.py), the fused step
must give the general path's states, ranking scores and victims bit for bit: it is the same arithmetic in the
same order. Compiled by inductor, it may round differently (vectorised ``expm1``,
another order of operations), so the compiled states are held to a rounding bound derived from the recurrence,
and the victims to the general path's wherever the lowest score is not within that bound of the next one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import momentkv
from momentkv.core import compiled as compiled_mod
from momentkv.core import eviction as eviction_mod
from momentkv.core.eviction import LayerEviction
from momentkv.core.fused_scoring import FusedStep, fused_spec
from momentkv.core.plan import build_plans
from momentkv.core import native_build, native_scoring
from momentkv.scoring.base import ScoreContext

PROMPT = 7
BUDGET = 24
B, H = 2, 3

POLICIES = {
    "moment": "moment.yaml",
    "h2o_like": {"name": "h", "decode": {"budget": BUDGET, "sinks": 2, "recent": 4,
                                         "scorers": [{"type": "accumulated"}]}},
    "tova_like": {"name": "t", "decode": {"budget": BUDGET, "scorers": [{"type": "instantaneous"}]}},
    "weighted": {"name": "w", "decode": {"budget": BUDGET, "recent": 3, "scorers": [
        {"type": "ema", "alpha": 0.8, "normalize": "sum", "weight": 0.5},
        {"type": "ema", "alpha": 1.0, "bias_correction": True, "normalize": "max"},
        {"type": "recency", "normalize": "zscore", "weight": 0.25},
        {"type": "instantaneous", "normalize": "rank", "weight": 2.0},
        {"type": "accumulated", "normalize": "rank"}]}},
}


@pytest.fixture(autouse=True)
def _tensor_step(monkeypatch):
    """These tests are about the step as tensor operations (and its inductor form): the native step stays off."""
    monkeypatch.setattr(native_build, "_SETTING", "0")


def _plan(policy):
    data = momentkv.load_policy(policy).model_dump()
    data["decode"]["budget"] = BUDGET
    return build_plans(momentkv.load_policy(data), 1, [None])[0]


def _run(plan, steps: int, fused: bool, seed: int = 0):
    """Drive one layer's eviction core through ``steps`` steady-state decode steps (random attention, the
    victim's slot taking each new token); return the states, scores and victims of every step."""
    g = torch.Generator().manual_seed(seed)
    ev = LayerEviction(plan)
    if not fused:
        ev.spec = ev.fused = None
    ev.scoring.start(B, H, BUDGET, "cpu")
    positions = torch.stack([torch.randperm(BUDGET, generator=g) + PROMPT for _ in range(B * H)]).view(B, H, BUDGET)
    view = ScoreContext(None, None, None, positions=positions, layer_idx=0, num_layers=1)
    now = PROMPT + BUDGET - 1
    trace = []
    for _ in range(steps):
        view.now = now
        attention = torch.rand(B, H, BUDGET, generator=g).softmax(-1)
        ev.fold(attention, view, PROMPT)
        now += 1
        victim = ev.lowest(view, PROMPT)  # the slot the token at ``now`` takes
        trace.append(([s.clone() for s in ev.scoring.states], ev.scoring.step_total.clone(), victim.clone()))
        positions.scatter_(-1, victim, now)
        ev.scoring.reset_slot(victim)
    return trace


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fused_step_equals_the_general_path_bit_for_bit(name):
    plan = _plan(POLICIES[name])
    assert fused_spec(plan) is not None
    general, fused = _run(plan, 30, fused=False), _run(plan, 30, fused=True)
    for (states_g, total_g, victim_g), (states_f, total_f, victim_f) in zip(general, fused):
        assert all(torch.equal(a, b) for a, b in zip(states_g, states_f))
        assert torch.equal(total_g, total_f)
        assert torch.equal(victim_g, victim_f)


def test_fused_step_is_used_and_names_the_next_victim(monkeypatch):
    plan = _plan("moment.yaml")
    calls = []
    original = FusedStep.__call__
    monkeypatch.setattr(FusedStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    _run(plan, 5, fused=True)
    assert len(calls) == 5


@pytest.mark.parametrize("decode", [
    {"budget": BUDGET, "cadence": 2, "scorers": [{"type": "ema"}]},
    {"budget": BUDGET, "granularity": "layer", "scorers": [{"type": "ema"}]},
    {"budget": BUDGET, "scope": "all", "scorers": [{"type": "ema"}]},
    {"budget": BUDGET, "scorers": [{"type": "ema", "window": 4}]},
    {"budget": BUDGET, "scorers": [{"type": "key_norm"}]},
    {"budget": {"ratio": 0.5, "floor": 8}, "scorers": [{"type": "ema"}]},
])
def test_plans_outside_the_closed_formula_keep_the_general_path(decode):
    policy = momentkv.load_policy({"name": "x", "decode": decode})
    plan = build_plans(policy, 1, [None])[0]
    assert fused_spec(plan) is None
    assert LayerEviction(plan).fused is None


def test_sliding_layers_keep_the_general_path():
    assert fused_spec(build_plans(momentkv.load_policy("moment.yaml"), 1, [16])[0]) is None


def _ema_bound(state: torch.Tensor, steps: int) -> torch.Tensor:
    """Rounding bound of ``I = 0.9 I + a`` after ``steps`` float32 steps (two roundings per step, each at most
    ``u`` of a value at most ``max I``), doubled since both paths round."""
    u = 2.0 ** -24
    return 2 * 2 * u * steps * state.abs().max() + 1e-30


def test_compiled_step_matches_eager_within_rounding(monkeypatch):
    plan = _plan("moment.yaml")
    steps = 12
    monkeypatch.setattr(compiled_mod, "_SETTING", "1")
    compiled = _run(plan, steps, fused=True, seed=3)
    assert any(name == "fused_scoring" for name, _ in compiled_mod.compile_times())  # compiled, and timed
    monkeypatch.setattr(compiled_mod, "_SETTING", "0")
    eager = _run(plan, steps, fused=True, seed=3)
    for step, ((states_e, total_e, victim_e), (states_c, total_c, victim_c)) in enumerate(zip(eager, compiled), 1):
        assert (states_e[0] - states_c[0]).abs().max() <= _ema_bound(states_e[0], step)
        if not torch.equal(victim_e, victim_c):
            # A rounding difference may swap two EMA values that tie within it: one adjacent swap moves a slot's
            # rank by 1/(T-1). The compiled victim must then be that close to the lowest; after it the two runs
            # hold different tokens and are no longer comparable.
            picked = total_e.gather(-1, victim_c)
            assert bool((picked - total_e.amin(-1, keepdim=True) <= 1.0 / (BUDGET - 1) + 1e-6).all())
            break


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(compiled_mod, "_SETTING", "1")
    monkeypatch.setattr(compiled_mod, "_failed", [])

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(eviction_mod, "_FUSED", {})
    plan = _plan("moment.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _run(plan, 6, fused=True)
    messages = [str(w.message) for w in caught if "compiling the scoring step failed" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert not compiled_mod.enabled("cpu")
    monkeypatch.setattr(compiled_mod, "_failed", [])
    monkeypatch.setattr(compiled_mod, "_SETTING", "0")
    reference = _run(plan, 6, fused=True)
    for (s1, t1, v1), (s2, t2, v2) in zip(fallback, reference):
        assert torch.equal(t1, t2) and torch.equal(v1, v2)
