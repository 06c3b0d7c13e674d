"""Decode steps that score compute attention once: output within a derived rounding bound of float64 SDPA."""

import pytest
import torch
import torch.nn.functional as F

import momentkv
from accuracy import assert_within_bound, attention_error_bounds, attention_reference, excess, group_mean_bound
from loops import physical_run
from models import FAMILIES, prompts, tiny_model
from momentkv.core.group_attention import attend, group_mean

# Whole patched models against unpatched ones (SDPA), per dtype: two units in the last place of each dtype at
# |x| ~ 1. A patched model differs from the unpatched one only in how its attention rounds (the single pass
# rounds once to the model's dtype, SDPA's CPU kernel at other places, differently per vector path), and
# the logits carry that through the layers: measured at most 0.05 (float32) and 0.2 (float16, bfloat16) of
# this tolerance with ATen's default, AVX2 and AVX-512 paths at 1 and 2 threads. The attention itself is held
# to a bound derived from its computation (``accuracy.py``), which no CPU's rounding can exceed.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCE)
SHAPES = [(1, 4, 2, 1, 9, 16), (3, 6, 2, 1, 37, 8), (2, 5, 5, 1, 123, 32), (2, 8, 1, 3, 11, 16)]


def _sdpa(query, key, value, allowed, scaling):
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling).transpose(1, 2)


def _inputs(shape, dtype):
    b, heads, kv, q, s, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    query = torch.randn(b, heads, q, d, generator=g).to(dtype)
    key = torch.randn(b, kv, s, d, generator=g).mul(3).to(dtype)
    value = torch.randn(b, kv, s, d, generator=g).to(dtype)
    allowed = torch.rand(b, 1, q, s, generator=g) > 0.3
    allowed[..., -1] = True  # every query sees itself
    allowed[..., 0] = False  # and not the first key: a mask that changes the result
    return query, key, value, allowed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_matches_sdpa(dtype, shape):
    """SDPA's semantics (scale, mask, grouped heads) run in float64 are the reference; the single pass's
    output and probabilities lie within the worst-case rounding bound of its own computation (``accuracy.py``),
    whatever order or vector path the CPU sums in. SDPA's own rounding plays no part."""
    b, heads, kv, q, s, d = shape
    query, key, value, allowed = _inputs(shape, dtype)
    out, probs = attend(query, key, value, allowed, d**-0.5)
    assert out.dtype == dtype and out.shape == (b, q, heads, d)
    assert probs.dtype == torch.float32 and probs.shape == (b, kv, heads // kv, q, s)
    exact = _sdpa(query.double(), key.double(), value.double(), allowed, d**-0.5)
    out_bound, probs_bound = attention_error_bounds(query, key, value, allowed, d**-0.5, out_dtype=dtype)
    assert_within_bound(out, exact, out_bound, "output")
    _, exact_probs = attention_reference(query, key, value, allowed, d**-0.5)  # (b, heads, q, s) float64
    assert_within_bound(probs.reshape(b, heads, q, s), exact_probs, probs_bound, "probabilities")
    mean, mean_bound = group_mean_bound(exact_probs[:, :, -1], probs_bound[:, :, -1], heads // kv)
    assert_within_bound(group_mean(probs[:, :, :, -1]), mean, mean_bound, "group mean")
    assert bool((probs[~allowed.unsqueeze(1).expand_as(probs)] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_bound_fails_a_real_defect(dtype, shape):
    """The bound is tight enough to matter: outputs 3% off, a scale 10% off, a dropped mask or keys given to
    the wrong query heads all exceed it, in every dtype."""
    b, heads, kv, q, s, d = shape
    query, key, value, allowed = _inputs(shape, dtype)
    exact = _sdpa(query.double(), key.double(), value.double(), allowed, d**-0.5)
    bound, _ = attention_error_bounds(query, key, value, allowed, d**-0.5, out_dtype=dtype)
    out, _ = attend(query, key, value, allowed, d**-0.5)
    assert excess(out, exact, bound) <= 1
    defects = {
        "3% off": (out.double() * 1.03).to(dtype),
        "scale": attend(query, key, value, allowed, 1.1 * d**-0.5)[0],
        "no mask": attend(query, key, value, None, d**-0.5)[0],
    }
    if 1 < kv < heads:  # query head h reads KV head h % kv instead of h // groups
        order = torch.arange(heads).view(kv, heads // kv).T.reshape(-1)
        defects["head mapping"] = attend(query[:, order], key, value, allowed, d**-0.5)[0][:, :, order.argsort()]
    for name, wrong in defects.items():
        assert excess(wrong, exact, bound) > 2, name


def test_attend_additive_mask_and_group_mean_match_eager_weights():
    b, heads, kv, s, d = 2, 6, 3, 14, 8
    query, key, value = torch.randn(b, heads, 1, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    additive = torch.zeros(b, 1, 1, s)
    additive[0, ..., :4] = torch.finfo(torch.float32).min
    _, probs = attend(query, key, value, additive, d**-0.5)
    logits = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * d**-0.5 + additive
    weights = logits.softmax(-1)[:, :, 0]  # (b, heads, S)
    torch.testing.assert_close(group_mean(probs[:, :, :, 0]), weights.view(b, kv, 2, s).mean(2))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_decode_within_tolerance_of_unpatched(dtype, family):
    model = tiny_model(family, dtype=dtype)
    inputs = prompts(batch=3, length=6)
    policy = {"decode": {"budget": 32, "scorers": [{"type": "ema"}]}}
    got, cache = physical_run(model, policy, inputs, steps=6)
    full, _ = physical_run(model, "full.yaml", inputs, steps=6)
    assert cache.stats()["evicted"] == 0
    assert all(layer.scores is not None for layer in cache.layers)  # scoring ran: the single pass was taken
    torch.testing.assert_close(got.float(), full.float(), **TOLERANCE[dtype])


def test_generate_skips_scoring_when_the_budget_cannot_be_reached():
    model = tiny_model("llama")
    inputs = prompts(batch=2, length=6)
    with momentkv.patched(model, {"decode": {"budget": 8, "scorers": [{"type": "ema"}]}}) as handle:
        model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert all(layer.scores is None for layer in handle.last_cache.layers)
        model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert all(layer.scores is not None for layer in handle.last_cache.layers)
        assert handle.stats()["evicted"] > 0
