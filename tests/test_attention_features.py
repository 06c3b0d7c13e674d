"""The single pass honours what a family's attention adds to the scale: Gemma 2's logit soft-capping and
GPT-OSS's learned sinks, against the families' own eager functions in transformers. The single pass computes
in float32 (as on every model); the eager functions run in float64 on the same inputs, so the differences are
float32 rounding of logits up to about 10 (1e-5 leaves room for it and none for a wrong formula: dropping the
cap or the sinks moves the results by more than 1e-3, asserted)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from momentkv.core.group_attention import Logits, attend, group_attention, group_mean, logit_rule

B, H, KV, S, D = 2, 6, 2, 11, 16


def _inputs(q_len=1, seed=0, scale=3.0):
    """float64 tensors holding float32 values (the engine's inputs are their float32 casts)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, q_len, D, generator=g) * scale).double()
    k = (torch.randn(B, KV, S, D, generator=g) * scale).double()
    v = torch.randn(B, KV, S, D, generator=g).double()
    allowed = torch.rand(B, 1, q_len, S, generator=g) > 0.3
    allowed[..., -1] = True  # every query sees itself
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return q, k, v, allowed, additive


def _module(sinks=None):
    return SimpleNamespace(num_key_value_groups=H // KV, head_dim=D, training=False, sinks=sinks)


def test_a_scale_alone_stays_a_float():
    assert logit_rule(0.25) == 0.25 and isinstance(logit_rule(0.25), float)
    assert logit_rule(0.25, softcap=50) == Logits(0.25, 50.0, None)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("cap", [50.0, 5.0])
def test_soft_capping_equals_gemma2_eager(q_len, cap):
    q, k, v, allowed, additive = _inputs(q_len)
    expected_out, expected_weights = gemma2_eager(_module(), q, k, v, additive, scaling=0.2, softcap=cap)
    out, probs = attend(q.float(), k.float(), v.float(), allowed, logit_rule(0.2, softcap=cap))
    torch.testing.assert_close(out.double(), expected_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(probs.reshape(B, H, q_len, S).double(), expected_weights.double(), rtol=0, atol=1e-5)
    uncapped, _ = attend(q.float(), k.float(), v.float(), allowed, 0.2)
    assert (uncapped.double() - expected_out).abs().max() > 1e-3  # the cap changes the result here


@pytest.mark.parametrize("q_len", [1, 4])
def test_sinks_equal_gpt_oss_eager(q_len):
    q, k, v, allowed, additive = _inputs(q_len, seed=1, scale=1.0)
    sinks = torch.linspace(-2.0, 3.0, H, dtype=torch.float64)
    expected_out, expected_weights = gpt_oss_eager(_module(sinks), q, k, v, additive, scaling=0.25)
    out, probs = attend(q.float(), k.float(), v.float(), allowed, logit_rule(0.25, sinks=sinks))
    torch.testing.assert_close(out.double(), expected_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(probs.reshape(B, H, q_len, S).double(), expected_weights, rtol=0, atol=1e-5)
    # The sinks take mass and are no token: each head's probabilities over the keys sum to less than one.
    totals = probs.sum(-1).reshape(B, H, q_len)
    assert (totals < 1 - 1e-3).all()
    without, _ = attend(q.float(), k.float(), v.float(), allowed, 0.25)
    assert (without.double() - expected_out).abs().max() > 1e-3
    # What the scorers get: the attention of the last query, averaged over each KV head's group.
    attention = group_attention(q.float(), k.float(), allowed, logit_rule(0.25, sinks=sinks))
    torch.testing.assert_close(attention.double(), group_mean(expected_weights[:, :, -1].view(B, KV, H // KV, S)),
                               rtol=0, atol=1e-5)


def test_a_row_that_sees_no_key_gives_zeros_with_sinks():
    q, k, v, allowed, _ = _inputs(1, seed=2)
    allowed[0] = False
    out, probs = attend(q.float(), k.float(), v.float(), allowed, logit_rule(0.25, sinks=torch.zeros(H)), rows_may_be_empty=True)
    assert torch.equal(probs[0], torch.zeros_like(probs[0])) and torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(probs).all()


def test_softcap_and_sinks_together_match_their_definition():
    q, k, v, allowed, _ = _inputs(1, seed=3)
    sinks = torch.randn(H, dtype=torch.float64)
    _, probs = attend(q.float(), k.float(), v.float(), allowed, logit_rule(0.3, softcap=4.0, sinks=sinks))
    logits = torch.tanh(torch.einsum("bhqd,bhsd->bhqs", q, k.repeat_interleave(H // KV, 1)) * 0.3 / 4.0) * 4.0
    logits = logits.masked_fill(~allowed, float("-inf"))
    full = torch.cat([logits, sinks.view(1, H, 1, 1).expand(B, H, 1, 1)], dim=-1).softmax(-1)[..., :-1]
    torch.testing.assert_close(probs.reshape(B, H, 1, S).double(), full, rtol=0, atol=1e-5)
