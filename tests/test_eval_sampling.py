"""Sampled references: one seeded stream per prompt, independent of the batch; teacher forcing follows the sample;
the repetition of each reference is measured."""

from __future__ import annotations

import math

import pytest
import torch

from momentkv.errors import PolicyError
from momentkv.eval.configs import build_configs
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.repetition import repeated_ngram_share, repetition_per_prompt
from momentkv.eval.runner import run_eval
from momentkv.eval.sampling import Sampling, TokenChooser, prompt_uniforms, sample_tokens
from tests.models import tiny_model

STEPS = 16


def _prompts(n=4):
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 6, 12, 7][:n]
    encoded = [torch.randint(3, 128, (length,), generator=g).tolist() for length in lengths]
    records = [PromptRecord(id=f"p{i}", prompt="x", kind="free" if i % 2 else "grounded") for i in range(n)]
    return encoded, records


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def _reference(model, encoded, records, sampling, batch_size, configs=("full.yaml",), free_run=False):
    return run_eval(model, encoded, records, build_configs(list(configs), None), STEPS, [2], 0,
                    batch_size=batch_size, progress=False, sampling=sampling, free_run=free_run)


def test_a_prompts_sample_does_not_depend_on_batch_order_or_subset(model):
    encoded, records = _prompts()
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    batched = _reference(model, encoded, records, sampling, batch_size=4).reference_tokens
    alone = _reference(model, encoded, records, sampling, batch_size=1).reference_tokens
    order = [2, 0, 3]
    subset = _reference(model, [encoded[i] for i in order], [records[i] for i in order], sampling,
                        batch_size=2).reference_tokens
    assert torch.equal(batched, alone)
    assert torch.equal(subset, batched[order])


def test_sampling_is_reproducible_and_seeded(model):
    encoded, records = _prompts(3)
    a = _reference(model, encoded, records, Sampling(1.0, 1.0, seed=3), 3).reference_tokens
    b = _reference(model, encoded, records, Sampling(1.0, 1.0, seed=3), 3).reference_tokens
    c = _reference(model, encoded, records, Sampling(1.0, 1.0, seed=4), 3).reference_tokens
    greedy = _reference(model, encoded, records, None, 3).reference_tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)
    assert not bool((a == 2).any())  # end of sequence is never drawn


def test_teacher_forcing_follows_the_sampled_tokens(model):
    encoded, records = _prompts(3)
    out = _reference(model, encoded, records, Sampling(1.0, 0.95, seed=1), 3,
                     configs=("full.yaml", "recency.yaml"), free_run=True)
    full = out.results[0]
    # The full cache replays its own sample exactly: KL 0, its NLL is the NLL of the sampled tokens.
    assert torch.count_nonzero(full.metrics.kl) == 0
    assert torch.equal(full.metrics.nll, out.reference_nll)
    assert bool(full.metrics.agree.all())
    # Free running draws from the same streams, so the full cache reproduces the sample token for token.
    assert torch.equal(full.free.tokens, out.reference_tokens)


def test_top_p_keeps_the_nucleus_and_inverse_cdf_picks_by_the_uniform():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = torch.linspace(0.0, 0.999, 200, dtype=torch.float64)
    drawn = torch.stack([sample_tokens(logits, x.view(1), 1.0, 0.8) for x in u]).flatten()
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: the rest is cut
    assert int(sample_tokens(logits, torch.tensor([0.0]), 1.0, 1.0)) == 0
    assert int(sample_tokens(logits, torch.tensor([0.99]), 1.0, 1.0)) == 3
    # A low temperature sharpens towards the argmax.
    assert int(sample_tokens(logits, torch.tensor([0.9]), 0.05, 1.0)) == 0
    # top_p small: only the most probable token remains.
    assert int(sample_tokens(logits, torch.tensor([0.99]), 1.0, 0.1)) == 0


def test_uniform_streams_depend_on_seed_and_id_only():
    a = prompt_uniforms(["x", "y"], 8, seed=0)
    b = prompt_uniforms(["y", "x"], 8, seed=0)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, prompt_uniforms(["x", "y"], 8, seed=1))
    chooser = TokenChooser([1], Sampling(1.0, 1.0, 0), ["x"], 8)
    logits = torch.zeros(1, 4)
    logits[0, 1] = 10.0  # the most likely token is suppressed
    assert int(chooser.choose(0, logits, [0])) != 1


@pytest.mark.parametrize("kwargs, message", [({"temperature": 0.0}, "--temperature"),
                                             ({"temperature": -1.0}, "--temperature"),
                                             ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p")])
def test_bad_sampling_settings_raise_policy_error(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Sampling(**kwargs)


def test_repetition_share_of_repeated_ngrams():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6], n=2) == 0.0
    # 1 2 1 2 1 2: bigrams 12 21 12 21 12 -> 2 distinct of 5
    assert repeated_ngram_share([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert math.isnan(repeated_ngram_share([1, 2], n=4))
    loop = torch.tensor([[7, 8, 9] * 10, list(range(30))])
    rep = repetition_per_prompt(loop, n=4)
    assert rep[0] > 0.85 and rep[1] == 0.0
