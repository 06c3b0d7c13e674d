"""The evaluation's metrics on a tiny random model: exact zeros where nothing is evicted, non-zero where it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from momentkv.eval.aggregate import bootstrap, paired_difference, per_prompt_means
from momentkv.eval.configs import build_configs, with_budget
from momentkv.eval.freerun import compare
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.runner import run_eval
from momentkv.policy import load_policy
from tests.models import tiny_model

STEPS = 24


def _prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 6, 12, 7, 8][:n]
    encoded = [torch.randint(3, 128, (length,), generator=g).tolist() for length in lengths]
    records = [PromptRecord(id=f"p{i}", prompt="x", kind="free" if i % 2 else "grounded") for i in range(n)]
    return encoded, records


@pytest.fixture(scope="module")
def results():
    model = tiny_model(layers=2)
    encoded, records = _prompts()
    configs = build_configs(["full.yaml", "recency.yaml", "moment.yaml"], [4, 1000])
    return run_eval(model, encoded, records, configs, STEPS, suppressed=[2], pad_id=0, batch_size=3, seed=0,
                    progress=False)


def _by_label(results, label):
    return next(r for r in results.results if r.config.label == label)


@pytest.mark.parametrize("label", ["full", "recency@1000", "moment@1000"])
def test_no_eviction_is_exact(results, label):
    r = _by_label(results, label)
    assert torch.count_nonzero(r.metrics.kl) == 0
    assert bool(r.metrics.agree.all())
    assert torch.equal(r.metrics.nll, results.reference_nll)
    assert bool((r.metrics.active_from == STEPS).all())
    assert bool((r.free.first_divergence == STEPS).all())
    assert torch.equal(r.free.tokens, results.reference_tokens)


@pytest.mark.parametrize("label", ["recency@4", "moment@4"])
def test_reached_budget_changes_distribution(results, label):
    r = _by_label(results, label)
    # The 5th generated token is the first to force an eviction: the logits of step 5 see it.
    assert bool((r.metrics.active_from == 5).all())
    # Before that, the only difference is the scoring steps' single-pass attention (float32 rounding, not
    # SDPA's): KL of the order of float32 rounding, far below what one eviction does.
    assert float(r.metrics.kl[:, :5].abs().max()) < 1e-6
    assert float(r.metrics.kl[:, 5:].mean()) > 1e-4
    assert bool((r.metrics.kl >= -1e-6).all())


def test_reference_suppresses_eos(results):
    assert not bool((results.reference_tokens == 2).any())
    assert results.reference_tokens.shape == (4, STEPS)


def test_batching_does_not_change_a_prompts_reference():
    model = tiny_model(layers=2)
    encoded, records = _prompts(3)
    configs = build_configs(["full.yaml"], None)
    batched = run_eval(model, encoded, records, configs, 12, [2], 0, batch_size=3, progress=False)
    alone = run_eval(model, encoded, records, configs, 12, [2], 0, batch_size=1, progress=False)
    assert torch.equal(batched.reference_tokens, alone.reference_tokens)


def test_active_mean_ignores_steps_before_first_eviction():
    values = torch.tensor([[9.0, 9.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    active = torch.tensor([2, 4])
    out = per_prompt_means(values, active)
    assert out[0] == 2.0 and np.isnan(out[1])
    assert per_prompt_means(values)[0] == 5.5


def test_bootstrap_interval_brackets_mean_and_is_seeded():
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.3, 0.5])
    a, b = bootstrap(x, seed=3), bootstrap(x, seed=3)
    assert a == b
    assert a.low <= a.mean <= a.high and a.low < a.high
    assert bootstrap(np.array([np.nan, np.nan]), 0).n == 0
    d = paired_difference(x + 1.0, x, seed=0)
    assert d.mean == pytest.approx(1.0) and d.low == pytest.approx(1.0)


def test_free_running_comparison():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    got = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    first, fraction = compare(got, ref)
    assert first.tolist() == [2, 4]
    assert fraction.tolist() == [0.75, 1.0]


def test_budget_override_scales_protections():
    h2o = with_budget(load_policy("h2o.yaml"), 32)
    assert h2o.decode.budget == 32 and h2o.decode.protections_for(32) == (0, 16)
    windowed = {"name": "w", "decode": {"budget": 128, "recent": 8, "scorers": [{"type": "ema", "alpha": 0.9}]}}
    tiny = with_budget(load_policy(windowed), 2)
    assert tiny.decode.budget == 2 and tiny.decode.recent == 1
    assert with_budget(load_policy("moment.yaml"), 2).decode.recent == 0  # no window stays no window
    assert with_budget(load_policy("full.yaml"), 8).decode is None
    labels = [c.label for c in build_configs(["full.yaml", "tova.yaml"], [8, 16])]
    assert labels == ["full", "tova@8", "tova@16"]


def test_mcnemar_exact_p_values_are_the_binomial_tail():
    from momentkv.eval.aggregate import mcnemar

    # 6 units only a passes, 1 only b: 2 * P[Bin(7, 1/2) <= 1] = 2 * 8/128.
    a = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 1.0])
    b = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 1.0])
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b, test.n) == (6, 1, 10)
    assert test.p == pytest.approx(16 / 128, rel=1e-12)
    assert mcnemar(b, a).p == test.p and (mcnemar(b, a).only_a, mcnemar(b, a).only_b) == (1, 6)
    # Balanced discordance is p = 1; no discordance is p = 1; a NaN unit is left out.
    assert mcnemar(np.array([1, 0.0]), np.array([0, 1.0])).p == 1.0
    assert mcnemar(np.ones(5), np.ones(5)).p == 1.0
    assert mcnemar(np.array([1, np.nan, 1.0]), np.array([0, 1, 0.0])).n == 2
    # 12 to 0 is significant at 0.001 (2 / 4096).
    assert mcnemar(np.ones(12), np.zeros(12)).p == pytest.approx(2 / 4096)
