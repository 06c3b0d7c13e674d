"""A patched model whose forward is compiled (momentkv/engine/compiled_decode.py): the growing cache runs eagerly,
the fixed-shape steady state compiled, with no graph break and no compilation per step; same tokens as eager.

Compilation makes these the slowest tests of the engine. Graph breaks and recompilations are decided by dynamo's
graph capture, which every backend shares: the tests use ``backend="eager"`` or ``"aot_eager"`` (the graph
inductor would get, functionalised and decomposed, run by ATen). Inductor's own C++ code generation of the
whole decode step costs about 30 s on two cores with a cold compile cache, beyond ``make test``'s budget: its
run is the same test with ``MOMENTKV_TEST_INDUCTOR=1`` (docs/performance.md reports it); the steady-state
scoring is compiled by inductor in ``make test`` (tests/test_core_fused_scoring.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig

import momentkv
from momentkv.engine.compiled_decode import RoutedForward, fixed_shape_problems
from momentkv.errors import PolicyError
from models import tiny_model

POLICY = {"name": "moment-6", "decode": {"budget": 6, "scorers": [
    {"type": "ema", "alpha": 0.9, "bias_correction": True, "normalize": "rank"},
    {"type": "recency", "normalize": "rank"}]}}
PROMPT, NEW = 9, 24
# Log-probabilities of the compiled step against the eager one. Inductor computes the same operations but fuses
# them and orders each reduction its own way (RMSNorm over the hidden size, the softmax and the output sum over
# the keys, the MLP's projections stay BLAS calls). Each reduction of n terms may move a float32 result by
# gamma(n) ~ n u of its magnitude; along the depth of this model (at most 2 layers, hidden 64, MLP 96, at most
# PROMPT + budget + 1 = 16 keys) that is at most 2 * (64 + 96 + 16) u = 352 u of the largest log-probability per
# path, counted for both paths. A wrong victim, mask or position moves log-probabilities by far more.
RTOL = 2 * 352 * 2.0**-24


def _inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, PROMPT), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _generate(model, inputs, **kwargs):
    out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits).float().log_softmax(-1)


def _positions(handle) -> list[torch.Tensor]:
    return [layer.positions.clone() for layer in handle.last_cache.layers]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(
    os.environ.get("MOMENTKV_TEST_INDUCTOR") != "1", reason="inductor's C++ build of a whole step: MOMENTKV_TEST_INDUCTOR=1"))


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_forward_gives_eager_tokens_with_two_compilations_and_no_graph_break(backend):
    model = tiny_model("llama")
    handle = momentkv.patch(model, POLICY)
    inputs = _inputs()
    eager_tokens, eager_logp = _generate(model, inputs)
    eager_positions = _positions(handle)
    assert handle.stats()["evicted"] > 0

    model.forward = torch.compile(model.forward, backend=backend)
    tokens, logp = _generate(model, inputs)
    assert torch.equal(tokens, eager_tokens)
    assert all(torch.equal(a, b) for a, b in zip(_positions(handle), eager_positions))  # the same evictions
    bound = RTOL * eager_logp.abs().amax()
    assert (logp - eager_logp).abs().max() <= bound
    # Steps after the budget filled (PROMPT + 6 slots): the first steady step compiles, the second recompiles
    # with the step counters symbolic, and no later step compiles; nothing breaks the graph.
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(counters["graph_break"].values()) == 0
    # The forward is the user's compiled one again after generate; a new cache of the same shapes reuses it.
    assert hasattr(model.__dict__["forward"], "_torchdynamo_orig_callable")
    again, _ = _generate(model, inputs)
    assert torch.equal(again, eager_tokens) and counters["stats"]["unique_graphs"] == 2
    momentkv.patch(model, POLICY)  # a new handle: new plans, equal to the old ones, guarded by identity
    again, _ = _generate(model, inputs)
    assert torch.equal(again, eager_tokens) and counters["stats"]["unique_graphs"] == 2


def test_compile_config_compiles_only_the_fixed_shape_steps(monkeypatch):
    calls = []
    original = RoutedForward.__call__

    routed_to_compiled = []

    def spy(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], [layer.stored for layer in kwargs["cache"].layers]))
        out = original(self, *args, **kwargs)
        routed_to_compiled[:] = [self.compiled_calls]
        return out

    monkeypatch.setattr(RoutedForward, "__call__", spy)
    model = tiny_model("llama")
    handle = momentkv.patch(model, POLICY)
    inputs = _inputs(batch=1, seed=1)
    eager_tokens, _ = _generate(model, inputs)
    assert not calls
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on the CPU only when asked this way
    tokens, _ = _generate(model, inputs, compile_config=config)
    assert torch.equal(tokens, eager_tokens)
    # transformers routes every decode step to its compiled call (the prompt stays eager); momentkv passes on
    # the growing steps and the first eviction (which stores the slots' positions) eagerly and compiles the
    # steps after it (PROMPT + 6 slots per layer)
    assert [q for q, _ in calls] == [1] * (NEW - 1)
    steady = [stored for _, stored in calls if stored == [PROMPT + 6] * 2]
    assert len(steady) == NEW - 1 - 6
    assert routed_to_compiled == [len(steady) - 1]
    assert counters["stats"]["unique_graphs"] == 2  # fullgraph=True: a graph break would have raised
    assert "get_compiled_call" not in model.__dict__ and handle.last_cache.compile_decode


@pytest.mark.parametrize("decode, problem", [
    (None, "keeps every generated token"),
    ({"budget": {"ratio": 0.5, "floor": 4}, "scorers": [{"type": "ema"}]}, "ratio budget"),
    ({"budget": 6, "cadence": 4, "scorers": [{"type": "ema"}]}, "evicts every 4 steps"),
    ({"budget": 6, "uncompressed_layers": [1], "scorers": [{"type": "ema"}]}, "layer 1 keeps every generated"),
])
def test_policies_without_fixed_shapes_are_refused_before_any_work(decode, problem):
    model = tiny_model("llama")
    handle = momentkv.patch(model, {"name": "p", "decode": decode})
    model.forward = torch.compile(model.forward, backend="eager")
    with pytest.raises(PolicyError, match=f"a compiled decode step needs every layer to reach a fixed shape.*{problem}"):
        model.generate(**_inputs(batch=1), max_new_tokens=3)
    assert handle.last_cache is None and counters["stats"]["unique_graphs"] == 0


def test_sliding_layers_have_no_fixed_shape():
    plans = momentkv.patch(tiny_model("mistral", sliding_window=8), POLICY).plans
    assert any("sliding-window layer" in p for p in fixed_shape_problems(plans))


def test_dynamic_false_is_refused():
    model = tiny_model("llama")
    momentkv.patch(model, POLICY)
    model.forward = torch.compile(model.forward, backend="eager", dynamic=False)
    with pytest.raises(PolicyError, match=r"dynamic=False\) under momentkv"):
        model.generate(**_inputs(batch=1), max_new_tokens=3)
    model.forward = model.forward._torchdynamo_orig_callable
    config = CompileConfig(backend="eager", dynamic=False)
    with pytest.raises(PolicyError, match=r"dynamic=False\) under momentkv"):
        model.generate(**_inputs(batch=1), max_new_tokens=3, compile_config=config)


def test_a_module_compiled_after_patch_is_refused_at_generate():
    model = tiny_model("llama")
    momentkv.patch(model, POLICY)
    model.compile()
    with pytest.raises(PolicyError, match=r"compiled in place .* compile its forward"):
        model.generate(**_inputs(batch=1), max_new_tokens=3)
