"""The native CPU scoring step (momentkv/core/native_scoring.cpp) against the fused step as tensor operations.

The tensor step (``FusedStep``) is itself proven bit for bit against the general path
(tests/test_core_fused_scoring.py). The native step performs the same float32 operations in the same order, so

- where every operation is exactly rounded the same way (the fold, recency, instantaneous attention, ``max``
  normalisation, ranks, an un-decayed bias correction), states, totals and victims are equal bit for bit, ties,
  broadcast positions and strided attention included;
- where a library function or a sum's order may round differently (``expm1f`` in the bias correction, the sums of
  ``sum`` and ``zscore``), states are still equal bit for bit, totals agree within a bound derived from those
  operations, and the victim is the tensor step's wherever the tensor step's lowest total is clear of the next
  by more than twice that bound; inputs whose ranked values lie within rounding of each other are not drawn.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import momentkv
from momentkv.core import eviction as eviction_mod
from momentkv.core.fused_scoring import FusedSpec, FusedStep, fused_spec
from momentkv.core.plan import build_plans
from momentkv.core import native_build, native_scoring

U = 2.0 ** -24
KINDS = ("ema", "accumulated", "instantaneous", "recency")


def _needs_compiler() -> None:
    """A machine without a C++ compiler skips (where one exists, a failed build fails)."""
    if native_scoring._compiler() is None:
        pytest.skip("no C++ compiler on this machine: scoring runs as tensor operations")


def _native(spec: FusedSpec) -> native_scoring.NativeStep:
    _needs_compiler()
    step = native_scoring.native_step(spec)
    assert step is not None, native_scoring.failure()
    return step


def _inputs(seed: int, b: int, h: int, t: int, prompt: int, now: int, *, ties: bool, broadcast: bool,
            strided: bool, stateful: int):
    g = torch.Generator().manual_seed(seed)
    if broadcast:
        positions = (torch.arange(t) + (now - t + 1)).expand(b, h, t)
    else:
        span = now - prompt + 1
        positions = torch.stack([torch.randperm(span, generator=g)[:t] + prompt for _ in range(b * h)]).view(b, h, t)
    width = t + (5 if strided else 0)
    attention = torch.rand(b, h, width, generator=g)
    if ties:
        attention = (attention * 4).floor() / 4
    attention = attention[..., width - t:]
    states = [torch.rand(b, h, t, generator=g) * 3 for _ in range(stateful)]
    if ties:
        states = [(s * 4).floor() / 4 for s in states]
    return states, attention, positions


def _steps(step, states, attention, positions, now: int, prompt: int, count: int):
    """``count`` steady steps: fold, name the victim, give its slot to the next token (state 0)."""
    trace = []
    for _ in range(count):  # the first step reads broadcast positions as given (stride 0), later ones a copy
        total, victim = step(states, attention, positions, now, prompt)
        trace.append(([s.clone() for s in states], total.clone(), victim.clone()))
        now += 1
        positions = positions.contiguous().scatter(-1, victim, now)
        for s in states:
            s.scatter_(-1, victim, 0.0)
        attention = attention.roll(1, dims=-1)
    return trace


part = st.tuples(st.sampled_from(KINDS), st.sampled_from([0.5, 0.9, 0.97, 1.0]), st.booleans(),
                 st.sampled_from(["none", "max", "rank"]), st.sampled_from([1.0, 0.5, 2.0, 0.25]))
shape = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40))


@settings(max_examples=80)
@given(parts=st.lists(part, min_size=1, max_size=4), dims=shape, sinks=st.integers(0, 3), recent=st.integers(0, 6),
       gap=st.integers(0, 50), ties=st.booleans(), broadcast=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_exactly_rounded_specs_equal_the_tensor_step_bit_for_bit(parts, dims, sinks, recent, gap, ties, broadcast,
                                                                  strided, seed):
    # A decayed bias correction calls expm1, whose last bit may differ from ATen's: it has the test below.
    parts = tuple((k, a, c and (k != "ema" or a == 1.0), n, w) for k, a, c, n, w in parts)
    b, h, t = dims
    spec = FusedSpec(parts, sinks, recent, t)
    prompt, now = 5, 5 + t - 1 + gap
    states, attention, positions = _inputs(seed, b, h, t, prompt, now, ties=ties, broadcast=broadcast,
                                           strided=strided, stateful=len(spec.stateful))
    eager = _steps(FusedStep(spec), [s.clone() for s in states], attention, positions, now, prompt, 4)
    native = _steps(_native(spec), [s.clone() for s in states], attention, positions, now, prompt, 4)
    for (states_e, total_e, victim_e), (states_n, total_n, victim_n) in zip(eager, native):
        assert all(torch.equal(x, y) for x, y in zip(states_e, states_n))
        assert torch.equal(total_e, total_n)
        assert torch.equal(victim_e, victim_n)


@pytest.mark.parametrize("t", [17, 1024, 1025, 1500])
def test_ranks_counted_and_sorted_equal_the_tensor_step(t):
    """Up to 1,024 slots the native step counts each slot's rank (vectorised comparisons), above it sorts: both
    equal torch's stable sort bit for bit, ties (a quarter-step grid), NaN and signed zeros included."""
    spec = FusedSpec((("ema", 0.9, False, "rank", 1.0), ("recency", 1.0, False, "rank", 0.5),
                      ("instantaneous", 1.0, False, "rank", 2.0)), 1, 2, t)
    prompt, now = 5, 5 + t - 1 + 7
    states, attention, positions = _inputs(t, 2, 2, t, prompt, now, ties=True, broadcast=False, strided=False,
                                           stateful=1)
    attention[0, 0, :3] = torch.tensor([float("nan"), -0.0, 0.0])
    eager = _steps(FusedStep(spec), [s.clone() for s in states], attention, positions, now, prompt, 2)
    before = torch.get_num_threads()
    try:  # from t = 1,024 on, 2 rows x 2 heads reach the size where the step shares its rows between threads
        torch.set_num_threads(2)
        native = _steps(_native(spec), [s.clone() for s in states], attention, positions, now, prompt, 2)
    finally:
        torch.set_num_threads(before)
    exactly = dict(rtol=0, atol=0, equal_nan=True)
    for (states_e, total_e, victim_e), (states_n, total_n, victim_n) in zip(eager, native):
        for x, y in zip(states_e, states_n):
            torch.testing.assert_close(y, x, **exactly)
        torch.testing.assert_close(total_n, total_e, **exactly)
        assert torch.equal(victim_e, victim_n)


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(part, min_size=1, max_size=3),
       b=st.integers(1, 4), h=st.integers(1, 3), t=st.integers(1, 40), sinks=st.integers(0, 3),
       recent=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_the_paged_step_on_pools_equals_the_step_on_gathered_views(parts, b, h, t, sinks, recent, seed):
    """A paged engine's per-slot pools, folded where they lie (cells named by a flat index), end exactly as
    gathering them, stepping, and scattering back would leave them: states, totals and victims, bit for bit; the
    cells no row names are untouched."""
    parts = tuple((k, a, c and (k != "ema" or a == 1.0), n, w) for k, a, c, n, w in parts)  # as the test above
    _paged_equals_dense(FusedSpec(parts, sinks, recent, t), b, h, t, seed)


def test_the_paged_step_shared_among_threads_equals_the_step_on_gathered_views():
    """Rows x slots past the size where the step shares its rows among OpenMP threads (a serving engine's 32
    requests x 3 heads x 128 slots are): the paged step on two threads equals the dense step on one, on
    ``moment.yaml``'s parts and with ties."""
    spec = FusedSpec((("ema", 0.9, False, "rank", 1.0), ("recency", 1.0, False, "rank", 1.0)), 1, 2, 128)
    _paged_equals_dense(spec, 16, 3, 128, 7, threads=(1, 2))


def _paged_equals_dense(spec: FusedSpec, b: int, h: int, t: int, seed: int, threads=None) -> None:
    """``threads``: torch's thread count for the dense step and for the paged one (default: as they are)."""
    step = _native(spec)
    g = torch.Generator().manual_seed(seed)
    slots = b * t + 7
    table = torch.randperm(slots, generator=g)[: b * t].view(b, t)  # each row's slots, distinct
    flat = table.unsqueeze(-2) * h + torch.arange(h).view(h, 1)  # (b, h, t)
    now = torch.randint(t + 10, t + 60, (b, 1, 1), generator=g)
    prompt = torch.randint(0, 10, (b, 1, 1), generator=g)
    positions = torch.randint(0, 1000, (slots, h), generator=g)
    for r in range(b):  # distinct positions at or before now, after the prompt
        for head in range(h):
            span = int(now[r]) - int(prompt[r]) + 1
            positions[table[r], head] = torch.randperm(span, generator=g)[:t] + int(prompt[r])
    pools = [((torch.rand(slots, h, generator=g) * 4).floor() / 4) for _ in spec.stateful]
    attention = (torch.rand(b, h, t, generator=g) * 4).floor() / 4
    total = torch.full((slots, h), -7.0)

    before = torch.get_num_threads()
    dense_states = [p.view(-1)[flat] for p in pools]
    try:
        if threads:
            torch.set_num_threads(threads[0])
        expected_total, expected_victim = step(dense_states, attention, positions.view(-1)[flat], now, prompt)
    finally:
        torch.set_num_threads(before)
    expected_pools = [p.clone() for p in pools]
    for pool, state in zip(expected_pools, dense_states):
        pool.view(-1)[flat] = state
    expected_cells = total.clone()
    expected_cells.view(-1)[flat] = expected_total

    try:
        if threads:
            torch.set_num_threads(threads[1])
        victim = step.paged(pools, total, positions, flat.contiguous(), attention, now, prompt)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(victim, expected_victim)
    assert all(torch.equal(p, q) for p, q in zip(pools, expected_pools))
    assert torch.equal(total, expected_cells)


def test_a_paged_index_outside_the_pools_is_refused_before_anything_changes():
    spec = FusedSpec((("ema", 0.9, False, "rank", 1.0),), 0, 0, 4)
    step = _native(spec)
    pools, total = [torch.ones(10, 1)], torch.zeros(10, 1)
    positions = torch.arange(10).view(10, 1)
    index = torch.tensor([[[0, 1, 2, 10]]])
    with pytest.raises(ValueError, match="outside the per-slot pools"):
        step.paged(pools, total, positions, index, torch.zeros(1, 1, 4), 20, 0)
    assert torch.equal(pools[0], torch.ones(10, 1)) and torch.equal(total, torch.zeros(10, 1))


def _separated(values: torch.Tensor, rel: float) -> bool:
    """No two values of a row within ``rel`` (relative) of each other."""
    ordered = values.double().sort(dim=-1).values
    gaps = ordered.diff(dim=-1)
    return bool((gaps > rel * ordered[..., 1:].abs().clamp_min(1e-30)).all())


rounding_part = st.tuples(st.sampled_from(KINDS), st.sampled_from([0.5, 0.9, 0.97]), st.booleans(),
                          st.sampled_from(["none", "sum", "max", "zscore", "rank"]),
                          st.sampled_from([1.0, 0.5, 2.0]))


@settings(max_examples=80)
@given(parts=st.lists(rounding_part, min_size=1, max_size=3), dims=shape, sinks=st.integers(0, 3),
       recent=st.integers(0, 6), gap=st.integers(0, 3000), seed=st.integers(0, 2**16))
def test_rounded_specs_agree_within_their_bound(parts, dims, sinks, recent, gap, seed):
    parts = tuple(parts)
    b, h, t = dims
    spec = FusedSpec(parts, sinks, recent, t)
    prompt, now = 5, 5 + t - 1 + gap
    states, attention, positions = _inputs(seed, b, h, t, prompt, now, ties=False, broadcast=False, strided=False,
                                           stateful=len(spec.stateful))
    eager_states, native_states = [s.clone() for s in states], [s.clone() for s in states]
    total_e, victim_e = FusedStep(spec)(eager_states, attention, positions, now, prompt)
    total_n, victim_n = _native(spec)(native_states, attention, positions, now, prompt)
    assert all(torch.equal(x, y) for x, y in zip(eager_states, native_states))  # the fold is exact in both
    # Ranked values within a few roundings of each other may rank either way: such inputs are not judged.
    ages = (now - positions).double()
    for state, (kind, alpha, corrected, how, _) in zip(eager_states, [p for p in parts if p[0] in ("ema", "accumulated")]):
        if how == "rank" and kind == "ema" and corrected:
            values = state.double() / -torch.expm1((ages + 1) * math.log(alpha))
            if not _separated(values, 1e-5):
                return
    # sum: T additions of values bounded by the sum of |v|; zscore: the mean, T squares and their sum, a square
    # root; each a relative error of at most (T + 4) u of a value whose magnitude the normalisation bounds by
    # sqrt(T) (zscore) or 1 (sum, max); ranks are exact; doubled for the parts' own operations.
    scale = sum(abs(p[4]) * (math.sqrt(t) if p[3] == "zscore" else 1.0) for p in parts)
    bound = 2 * (2 * t + 8) * U * max(scale, 1.0) * max(1.0, float(total_e.abs().max()))
    assert float((total_e - total_n).abs().max()) <= bound
    if not torch.equal(victim_e, victim_n):
        chosen = total_e.gather(-1, victim_n)
        lowest = total_e.gather(-1, victim_e)
        assert bool((chosen - lowest <= 2 * bound).all())


def test_nan_and_signed_zero_are_ordered_as_torch_orders_them():
    spec = FusedSpec((("instantaneous", 1.0, False, "rank", 1.0), ("instantaneous", 1.0, False, "none", 1.0)), 0, 0, 6)
    attention = torch.tensor([[[0.0, -0.0, float("nan"), 0.5, -0.0, 0.0]]])
    positions = torch.arange(6).view(1, 1, 6) + 10
    for values in (attention, attention.flip(-1)):
        eager = FusedStep(spec)([], values, positions, 20, 5)
        native = _native(spec)([], values, positions, 20, 5)
        assert torch.equal(eager[0].isnan(), native[0].isnan())
        assert torch.equal(eager[0].nan_to_num(), native[0].nan_to_num())
        assert torch.equal(eager[1], native[1])  # a NaN total is the victim, as torch's argmin picks it


def test_a_fully_protected_head_names_its_first_slot_as_torch_does():
    spec = FusedSpec((("recency", 1.0, False, "rank", 1.0),), 0, 9, 4)
    positions = torch.arange(4).view(1, 1, 4) + 10
    eager = FusedStep(spec)([], None, positions, 13, 5)
    native = _native(spec)([], None, positions, 13, 5)
    assert torch.equal(eager[1], native[1]) and int(native[1]) == 0


def test_inputs_it_cannot_read_are_left_to_the_tensor_step():
    spec = FusedSpec((("ema", 0.9, True, "rank", 1.0),), 0, 0, 8)
    native = _native(spec)
    state, attention, positions = torch.zeros(1, 2, 8), torch.rand(1, 2, 8), torch.arange(16).view(1, 2, 8)
    assert native([state], attention, positions, 20, 0) is not None
    assert native([state], attention.double(), positions, 20, 0) is None
    assert native([state], attention, positions.int(), 20, 0) is None
    column_major = torch.zeros(1, 8, 2).transpose(1, 2)  # (1, 2, 8) whose rows are not contiguous
    assert native([column_major], attention, positions, 20, 0) is None
    assert native([state], torch.rand(1, 8, 2).transpose(1, 2), positions, 20, 0) is None
    assert native([state], None, positions, 20, 0) is None  # the EMA needs this step's attention
    assert native([state, state], attention, positions, 20, 0) is None
    assert native([state], attention, positions, 10, 0) is None  # slots after "now": not this step's positions
    assert native([state[..., :0]], attention[..., :0], positions[..., :0], 20, 0) is None  # no slot, no victim


def test_an_alpha_that_rounds_to_one_in_float32_is_corrected_as_the_tensor_step_corrects_it():
    alpha = 1.0 - 2.0 ** -26  # not 1 (the decayed correction), though float32 rounds it to 1
    spec = FusedSpec((("ema", alpha, True, "none", 1.0),), 0, 0, 6)
    g = torch.Generator().manual_seed(0)
    state, attention = torch.rand(1, 2, 6, generator=g), torch.rand(1, 2, 6, generator=g)
    positions = torch.arange(12).view(1, 2, 6) + 3
    eager_state, native_state = state.clone(), state.clone()
    total_e, _ = FusedStep(spec)([eager_state], attention, positions, 40, 3)
    total_n, _ = _native(spec)([native_state], attention, positions, 40, 3)
    assert torch.equal(eager_state, native_state)
    # 1 - alpha^(age+1) is about (age+1) * 2^-26: the decayed form, not the mean's age + 1.
    torch.testing.assert_close(total_n, total_e, rtol=1e-5, atol=0)
    assert float(total_n.abs().min()) > 1e5


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_generation_takes_the_native_step_at_every_steady_fold(family, monkeypatch):
    from models import tiny_model

    model = tiny_model(family)
    calls = {"native": 0, "tensor": 0}
    native_call, tensor_call = native_scoring.NativeStep.__call__, FusedStep.__call__

    def count_native(self, *args):
        out = native_call(self, *args)
        calls["native"] += out is not None
        return out

    def count_tensor(self, *args):
        calls["tensor"] += 1
        return tensor_call(self, *args)

    _needs_compiler()
    monkeypatch.setattr(native_scoring.NativeStep, "__call__", count_native)
    monkeypatch.setattr(FusedStep, "__call__", count_tensor)
    policy = momentkv.load_policy("moment.yaml").model_dump()
    policy["decode"]["budget"] = 16
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with momentkv.patch(model, policy):
        model.generate(ids, max_new_tokens=40, do_sample=False)
    layers = model.config.num_hidden_layers
    assert calls["tensor"] == 0 and calls["native"] >= layers * (40 - 16 - 2)


def test_a_damaged_library_file_is_built_again(monkeypatch, tmp_path):
    _needs_compiler()
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_scoring, "LIBRARY", native_scoring._library())
    target = native_scoring._build()
    target.write_bytes(b"not a shared library")
    assert native_scoring._function() is not None and native_scoring.failure() is None
    assert target.read_bytes() != b"not a shared library"


def test_a_cache_folder_others_can_write_to_is_refused(monkeypatch, tmp_path):
    _needs_compiler()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o777)
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="only this user can write"):
        native_scoring._build()


def test_without_a_compiler_scoring_stays_on_the_tensor_step_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(native_scoring, "LIBRARY", native_scoring._library())
    monkeypatch.setattr(eviction_mod, "_NATIVE", {})
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_scoring, "_compiler", lambda: None)
    plan = build_plans(momentkv.load_policy({"name": "m", "decode": {"budget": 6, "scorers": [{"type": "ema"}]}}),
                       1, [None])[0]
    spec = fused_spec(plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native_scoring.native_step(spec) is None
        assert native_scoring.native_step(spec) is None
    messages = [str(w.message) for w in caught if "native scoring step is unavailable" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    assert "no C++ compiler" in native_scoring.failure()
    assert not any(tmp_path.iterdir())


def test_a_compiler_command_with_arguments_is_split_as_a_shell_would(monkeypatch):
    monkeypatch.setenv("CXX", "env LC_ALL=C g++")
    assert native_scoring._compiler()[1:] == ["LC_ALL=C", "g++"]


def test_the_setting_turns_the_native_step_off(monkeypatch):
    monkeypatch.setattr(native_build, "_SETTING", "0")
    spec = FusedSpec((("recency", 1.0, False, "rank", 1.0),), 0, 0, 4)
    assert native_scoring.native_step(spec) is None and eviction_mod._native_for(spec) is None


def test_a_build_goes_to_the_cache_folder_once(monkeypatch, tmp_path):
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path))
    first = native_scoring._build()
    assert first.parent.parent == tmp_path and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert native_scoring._build() == first and first.stat().st_mtime_ns == stamp


@settings(max_examples=40)
@given(parts=st.lists(part, min_size=1, max_size=3), b=st.integers(2, 4), h=st.integers(1, 3), t=st.integers(2, 24),
       sinks=st.integers(0, 3), recent=st.integers(0, 5), gaps=st.lists(st.integers(0, 60), min_size=4, max_size=4),
       prompts=st.lists(st.integers(0, 40), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_rows_at_their_own_step_equal_each_row_stepped_alone(parts, b, h, t, sinks, recent, gaps, prompts, seed):
    """A paged engine's batch rows stand at different steps: ``now`` and ``prompt_tokens`` as ``(batch, 1, 1)``
    tensors give each row exactly what a call for that row alone gives, in the native step and the tensor step."""
    parts = tuple((k, a, c and (k != "ema" or a == 1.0), n, w) for k, a, c, n, w in parts)
    spec = FusedSpec(parts, sinks, recent, t)
    rows = []
    for r in range(b):
        prompt, now = prompts[r], prompts[r] + t - 1 + gaps[r]
        states, attention, positions = _inputs(seed + r, 1, h, t, prompt, now, ties=True, broadcast=False,
                                               strided=False, stateful=len(spec.stateful))
        rows.append((states, attention, positions, now, prompt))
    now = torch.tensor([row[3] for row in rows]).view(b, 1, 1)
    prompt = torch.tensor([row[4] for row in rows]).view(b, 1, 1)
    attention = torch.cat([row[1] for row in rows])
    positions = torch.cat([row[2] for row in rows])
    for step in (FusedStep(spec), _native(spec)):
        states = [torch.cat([row[0][i] for row in rows]) for i in range(len(spec.stateful))]
        total, victim = step(states, attention, positions, now, prompt)
        for r, (row_states, row_attention, row_positions, row_now, row_prompt) in enumerate(rows):
            alone_states = [s.clone() for s in row_states]
            alone_total, alone_victim = step(alone_states, row_attention, row_positions, row_now, row_prompt)
            assert all(torch.equal(s[r : r + 1], a) for s, a in zip(states, alone_states))
            assert torch.equal(total[r : r + 1], alone_total)
            assert torch.equal(victim[r : r + 1], alone_victim)


def test_per_row_values_of_the_wrong_length_are_refused():
    spec = FusedSpec((("recency", 1.0, False, "rank", 1.0),), 0, 0, 4)
    states, attention, positions = _inputs(0, 2, 1, 4, 0, 10, ties=False, broadcast=False, strided=False, stateful=0)
    with pytest.raises(ValueError, match="for a batch of 2 rows"):
        _native(spec)(states, attention, positions, torch.tensor([10, 11, 12]).view(3, 1, 1), 0)
