"""Equal total memory: prompt-intact policies get the total minus each prompt's length, whole-cache policies the
total; every pass's stored slots are checked against its budget."""

from __future__ import annotations

import pytest
import torch

from momentkv.errors import PolicyError
from momentkv.eval.configs import build_configs, build_total_configs
from momentkv.eval.memory import StoredTokensError, check_stored
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.runner import run_eval
from momentkv.policy import load_policy
from tests.models import tiny_model

STEPS = 20
LENGTHS = [5, 11, 8]
TOTAL = 18


@pytest.fixture(scope="module")
def results():
    g = torch.Generator().manual_seed(2)
    encoded = [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]
    records = [PromptRecord(id=f"p{i}", prompt="x", kind="free" if i % 2 else "grounded") for i in range(3)]
    configs = build_configs(["full.yaml"], None)
    configs += build_total_configs(["recency.yaml", "h2o.yaml", "recency-all.yaml", "moment-all.yaml",
                                    "h2o-all.yaml"], [TOTAL], LENGTHS, [r.id for r in records])
    lines = []
    out = run_eval(tiny_model(layers=2), encoded, records, configs, STEPS, [2], 0, batch_size=1, progress=False,
                   free_run=False, log=lines.append)
    return out, lines


def _by(results, label):
    return next(r for r in results.results if r.config.label == label)


def test_prompt_intact_policies_get_the_total_minus_each_prompt():
    windowed = {"name": "windowed", "decode": {"budget": 128, "recent": 64, "scorers": [{"type": "accumulated"}]}}
    (config,) = build_total_configs([windowed], [40], [10, 25], ["a", "b"])
    assert config.memory == "total" and config.budget == 40 and config.label == "windowed@T40"
    assert [p.decode.budget for p in config.prompt_policies] == [30, 15]
    assert [p.decode.recent for p in config.prompt_policies] == [15, 8]  # the window stays half the budget
    assert all(p.decode.scope == "decode" for p in config.prompt_policies)


def test_whole_cache_policies_get_the_total():
    (config,) = build_total_configs(["tova-all.yaml"], [40], [10, 25])
    assert config.prompt_policies is None and config.policy.decode.budget == 40


@pytest.mark.parametrize("label, scope", [("recency@T18", "decode"), ("h2o@T18", "decode"),
                                          ("recency-all@T18", "all"), ("moment-all@T18", "all"),
                                          ("h2o-all@T18", "all")])
def test_every_prompt_holds_the_total_after_the_last_step(results, label, scope):
    out, _ = results
    r = _by(out, label)
    # Each prompt ran alone: its slots are its own tokens, exactly the total once the budget is full.
    assert r.metrics.slots.tolist() == [float(TOTAL)] * len(LENGTHS)
    generated = r.metrics.generated_slots.tolist()
    if scope == "decode":
        assert generated == [float(TOTAL - n) for n in LENGTHS]  # the prompt stays whole
    else:
        assert all(g >= TOTAL - n for g, n in zip(generated, LENGTHS))  # prompt tokens may have gone
    assert float(r.metrics.kl.sum()) > 0


def test_each_run_prints_its_stored_slots(results):
    _, lines = results
    line = next(x for x in lines if x.startswith("recency@T18"))
    assert "KV slots per layer after the last step: mean 18.0" in line and "within budget" in line


def test_a_total_that_a_prompt_fills_is_refused_for_prompt_intact_policies():
    with pytest.raises(PolicyError, match=r"total budget 20 .* prompt 'long' \(25 tokens\)"):
        build_total_configs(["recency.yaml"], [20], [10, 25], ["short", "long"])
    assert build_total_configs(["recency-all.yaml"], [20], [10, 25], ["short", "long"])  # whole-cache: fine


def test_a_policy_that_compresses_the_prompt_has_no_total():
    with pytest.raises(PolicyError, match="compresses the prompt"):
        build_total_configs(["snapkv-moment.yaml"], [2000], [10])


def test_bad_totals_are_refused():
    with pytest.raises(PolicyError, match="positive"):
        build_total_configs(["recency.yaml"], [0], [10])


def test_per_prompt_policies_need_batch_size_one():
    configs = build_total_configs(["recency.yaml"], [30], [5, 6])
    with pytest.raises(ValueError, match="batch_size 1"):
        run_eval(tiny_model(layers=1), [[3] * 5, [4] * 6], [PromptRecord("a", "x"), PromptRecord("b", "x")],
                 configs, 4, [2], 0, batch_size=2, progress=False)


def _stats(stored, generated, budget):
    return {"layers": [{"layer": 0, "stored": stored, "generated_stored": generated, "budget": budget, "peak": stored}]}


def test_the_stored_check_catches_a_layer_over_budget():
    intact, whole = load_policy("recency.yaml"), load_policy("recency-all.yaml")
    assert check_stored(_stats(20, 8, 8), intact, "x").generated == 8
    with pytest.raises(StoredTokensError, match="layer 0 holds 9 generated tokens"):
        check_stored(_stats(21, 9, 8), intact, "x")
    assert check_stored(_stats(1152, 900, 1152), whole, "x").slots == 1152
    with pytest.raises(StoredTokensError, match="holds 1153 slots"):
        check_stored(_stats(1153, 900, 1152), whole, "x")
    assert check_stored(_stats(5000, 4000, None), intact, "x").max_slots == 5000  # an unbounded layer
