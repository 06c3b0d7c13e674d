"""The fused decode-attention kernel against its torch reference, and the reference against a naive one.

The reference is the engine's grouped attention on float32 copies of the inputs; the naive computation here
expands K/V per query head in float64, so the two share no code.

On a CUDA machine the Triton kernel runs natively. Without CUDA it runs under triton's CPU interpreter in one
subprocess started with ``TRITON_INTERPRET=1`` (see the kernel section below), so no other test sees the
variable. Shapes are tiny because the interpreter executes every program in Python.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from momentkv.kernels import decode_attention_reference, fused_decode_attention, triton_available

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (atol, rtol) per input dtype. ``out`` is rounded to the input dtype and, on a GPU, the kernel multiplies
# bf16/fp16 probabilities with V as tensor cores do; ``attn`` is float32 computed from the same products, so it
# stays tight for every dtype.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
ATTN_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-4)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """``allclose`` that treats NaN/inf as mismatches unless both sides agree, and names the first bad indices."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_bad = torch.isnan(a) != torch.isnan(e)
    inf_bad = (torch.isinf(a) | torch.isinf(e)) & (a != e)
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = (a - e).abs()
    value_bad = finite & (diff > atol + rtol * e.abs())
    bad = nan_bad | inf_bad | value_bad
    if not bad.any():
        return
    idx = bad.nonzero()[:5].tolist()
    shown = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
    raise AssertionError(
        f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (nan {int(nan_bad.sum())}, inf {int(inf_bad.sum())}, "
        f"max finite abs diff {diff[finite].max().item() if finite.any() else float('nan'):.3g}, "
        f"atol {atol}, rtol {rtol}); first: {shown}"
    )


def test_assert_close_reports_nan_and_first_index():
    expected = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match=r"nan 1.*\(1, 2\)"):
        assert_close(torch.tensor([[0.0, 0, 0], [0, 0, float("nan")]]), expected, 1e-3, 0)
    with pytest.raises(AssertionError, match=r"inf 1"):
        assert_close(torch.tensor([[float("inf"), 0, 0], [0, 0, 0]]), expected, 1e-3, 0)
    with pytest.raises(AssertionError, match=r"1/6 mismatches.*\(0, 1\): 0.5 vs 0"):
        assert_close(torch.tensor([[0.0, 0.5, 0], [0, 0, 0]]), expected, 1e-3, 0)
    assert_close(torch.tensor([float("nan"), float("-inf")]), torch.tensor([float("nan"), float("-inf")]), 0, 0)


def make_inputs(batch, heads, kv_heads, seq, dim, dtype, mask="none", seed=0, device=DEVICE):
    """Random decode inputs; ``mask`` is none, random, prefix (a fully masked prefix) or prefix+random."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, dim, generator=g).to(device, dtype)
    key = torch.randn(batch, kv_heads, seq, dim, generator=g).to(device, dtype)
    value = torch.randn(batch, kv_heads, seq, dim, generator=g).to(device, dtype)
    valid = None
    if mask != "none":
        valid = torch.ones(batch, seq, dtype=torch.bool)
        if "random" in mask:
            valid &= torch.rand(batch, seq, generator=g) > 0.3
        if "prefix" in mask:
            valid[:, : (2 * seq) // 3] = False
        valid[:, -1] = True  # the current token always attends to itself
        valid = valid.to(device)
    return query, key, value, valid


# ---------------------------------------------------------------------------------------------- reference


def naive_decode_attention(query, key, value, scaling, valid, softcap=None, sinks=None):
    """Float64, one softmax per query head over keys expanded with repeat_interleave (what the reference avoids);
    ``sinks`` join as one extra logit column whose probability is dropped (a row with no valid key gives 0)."""
    b, h, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    groups = h // kv
    k = key.double().repeat_interleave(groups, dim=1)  # (b, h, S, d)
    v = value.double().repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", query.double(), k) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    if sinks is None:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (b, h, S); a row with no valid key: zeros
    else:
        column = sinks.double().view(1, h, 1).expand(b, h, 1)
        probs = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :s]
    out = torch.einsum("bhs,bhsd->bhd", probs, v)
    return out, probs.view(b, kv, groups, s).mean(dim=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 16), (2, 4, 2, 5, 16), (3, 8, 2, 123, 64), (2, 4, 4, 257, 64)])
@pytest.mark.parametrize("mask", ["none", "random", "prefix"])
def test_reference_matches_naive_repeat_kv(dtype, shape, mask):
    b, h, kv, s, d = shape
    q, k, v, valid = make_inputs(b, h, kv, s, d, dtype, mask, device="cpu")
    out, attn = decode_attention_reference(q, k, v, d**-0.5, valid)
    want_out, want_attn = naive_decode_attention(q, k, v, d**-0.5, valid)
    assert out.dtype == dtype and attn.dtype == torch.float32
    assert_close(out, want_out, *OUT_TOL[dtype], name="out")
    assert_close(attn, want_attn, 1e-6, 1e-5, name="attn")
    if valid is not None:
        assert (attn.masked_select(~valid[:, None, :].expand_as(attn)) == 0).all()
    assert_close(attn.sum(-1), torch.ones(b, kv), 1e-5, 0, name="attn row sums")


def test_reference_fully_masked_row_gives_zeros():
    q, k, v, valid = make_inputs(2, 4, 2, 6, 16, torch.float32, "random", device="cpu")
    valid[1] = False
    out, attn = decode_attention_reference(q, k, v, 0.25, valid)
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    assert (out[1] == 0).all() and (attn[1] == 0).all()
    assert_close(out[0], naive_decode_attention(q, k, v, 0.25, valid)[0][0], 1e-5, 1e-5, name="out row 0")


# Soft-capping (Gemma 2) and learned sinks (GPT-OSS): the logits are large enough that the cap bites, and the
# sinks take a share of each row that dropping them would show (asserted below for the kernel).
FEATURES = ["softcap", "sinks", "softcap+sinks"]
FEATURE_SCALING = 0.5


def feature_kwargs(feature: str, heads: int) -> dict:
    kwargs = {}
    if "softcap" in feature:
        kwargs["softcap"] = 3.0
    if "sinks" in feature:
        kwargs["sinks"] = torch.linspace(-1.0, 4.0, heads)
    return kwargs


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mask", ["none", "prefix+random", "empty-row"])
def test_reference_with_softcap_and_sinks_matches_naive(feature, dtype, mask):
    q, k, v, valid = make_inputs(2, 8, 2, 41, 16, dtype, "random" if mask == "empty-row" else mask, device="cpu")
    if mask == "empty-row":
        valid[1] = False
    kwargs = feature_kwargs(feature, 8)
    out, attn = decode_attention_reference(q, k, v, FEATURE_SCALING, valid, **kwargs)
    want_out, want_attn = naive_decode_attention(q, k, v, FEATURE_SCALING, valid, **kwargs)
    assert out.dtype == dtype and attn.dtype == torch.float32
    assert_close(out, want_out, *OUT_TOL[dtype], name="out")
    assert_close(attn, want_attn, 1e-6, 1e-5, name="attn")
    if mask == "empty-row":
        assert (out[1] == 0).all() and (attn[1] == 0).all()
    if "sinks" in feature:  # the sinks take mass that no token gets
        assert (attn[0].sum(-1) < 1 - 1e-3).all()


def test_reference_softcap_equals_gemma2_eager():
    """The families' own eager functions (float64, one decode query) give what the reference gives (float32)."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager

    q, k, v, valid = make_inputs(2, 6, 2, 19, 16, torch.float32, "random", device="cpu")
    q, k, v = q.double() * 3, k.double() * 3, v.double()  # float32 values, logits well past the cap
    additive = torch.zeros(2, 1, 1, 19, dtype=torch.float64).masked_fill(~valid.view(2, 1, 1, 19), -1e300)
    module = SimpleNamespace(num_key_value_groups=3, head_dim=16, training=False)
    want_out, weights = gemma2_eager(module, q.unsqueeze(2), k, v, additive, scaling=0.25, softcap=5.0)
    out, attn = decode_attention_reference(q, k, v, 0.25, valid, softcap=5.0)
    assert_close(out, want_out[:, 0], 1e-5, 0, name="out")
    assert_close(attn, weights[:, :, 0].reshape(2, 2, 3, 19).mean(2), 1e-5, 0, name="attn")
    uncapped, _ = decode_attention_reference(q, k, v, 0.25, valid)
    assert (uncapped - want_out[:, 0]).abs().max() > 1e-3  # the cap changes the result here


def test_reference_sinks_equal_gpt_oss_eager():
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    q, k, v, valid = make_inputs(2, 6, 2, 19, 16, torch.float32, "random", device="cpu")
    q, k, v = q.double(), k.double(), v.double()
    sinks = torch.linspace(-2.0, 3.0, 6, dtype=torch.float64)
    additive = torch.zeros(2, 1, 1, 19, dtype=torch.float64).masked_fill(~valid.view(2, 1, 1, 19), -1e300)
    module = SimpleNamespace(num_key_value_groups=3, head_dim=16, training=False, sinks=sinks)
    want_out, weights = gpt_oss_eager(module, q.unsqueeze(2), k, v, additive, scaling=0.25)
    out, attn = decode_attention_reference(q, k, v, 0.25, valid, sinks=sinks)
    assert_close(out, want_out[:, 0], 1e-5, 0, name="out")
    assert_close(attn, weights[:, :, 0].reshape(2, 2, 3, 19).mean(2), 1e-5, 0, name="attn")
    without, _ = decode_attention_reference(q, k, v, 0.25, valid)
    assert (without - want_out[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("feature", FEATURES)
def test_engine_fused_step_passes_softcap_and_sinks(feature):
    """The engine's fused step (here through the reference, as on a CPU) computes what its torch single pass
    computes for the same logit rule."""
    from momentkv.core.group_attention import attend, group_mean, logit_rule
    from momentkv.engine import attention as attention_module

    q, k, v, valid = make_inputs(2, 8, 2, 23, 16, torch.float32, "random", device="cpu")
    mask = valid.view(2, 1, 1, 23)
    rule = logit_rule(FEATURE_SCALING, **feature_kwargs(feature, 8))
    out, attention = attention_module._fused_step(q.unsqueeze(2), k, v, mask, rule)
    want_out, probs = attend(q.unsqueeze(2), k, v, mask, rule)
    assert_close(out, want_out, 1e-6, 1e-6, name="out")
    assert_close(attention, group_mean(probs[:, :, :, -1]), 1e-7, 1e-6, name="attn")


@pytest.mark.parametrize(
    "change",
    [
        dict(query=torch.zeros(1, 3, 8)),  # 3 heads do not divide over 2 KV heads
        dict(value=torch.zeros(1, 2, 4, 8)),  # value length differs from key length
        dict(valid=torch.ones(1, 5)),  # not bool
        dict(valid=torch.ones(1, 4, dtype=torch.bool)),  # one flag per cached token
        dict(key=torch.zeros(1, 2, 5, 8, dtype=torch.float64), value=torch.zeros(1, 2, 5, 8, dtype=torch.float64)),
        dict(sinks=torch.zeros(2)),  # one sink per query head, not per KV head
    ],
)
def test_reference_rejects_bad_arguments(change):
    args = dict(query=torch.zeros(1, 4, 8), key=torch.zeros(1, 2, 5, 8), value=torch.zeros(1, 2, 5, 8),
                scaling=1.0, valid=None, sinks=None)
    args.update(change)
    with pytest.raises(ValueError):
        decode_attention_reference(**args)


@pytest.mark.parametrize("name", ["ema_state", "alpha", "score_start"])
def test_no_scorer_state_in_the_kernel_contract(name):
    """The engine folds the attention into the scorers itself: the kernels take no scorer state."""
    import inspect

    from momentkv.kernels import reference

    for fn in (fused_decode_attention, decode_attention_reference, reference.check_decode_args):
        assert name not in inspect.signature(fn).parameters, fn.__name__


def test_wrapper_uses_reference_on_cpu():
    q, k, v, valid = make_inputs(2, 8, 2, 33, 16, torch.float32, "random", device="cpu")
    out, attn = fused_decode_attention(q, k, v, 0.25, valid)
    want_out, want_attn = decode_attention_reference(q, k, v, 0.25, valid)
    assert torch.equal(out, want_out) and torch.equal(attn, want_attn)


def test_reference_is_the_engines_grouped_attention():
    """What the engine's single pass computes for a decode step, the reference computes too (float32)."""
    from momentkv.core.group_attention import attend, group_mean

    q, k, v, valid = make_inputs(2, 6, 2, 19, 16, torch.float32, "random", device="cpu")
    out, probs = attend(q.unsqueeze(2), k, v, None, 0.25)
    want_out, want_attn = decode_attention_reference(q, k, v, 0.25)
    assert torch.equal(out[:, 0], want_out) and torch.equal(group_mean(probs[:, :, :, 0]), want_attn)
    # With a mask the reference also allows a row with no valid key (zeros, not NaN), so it normalises by hand.
    out, probs = attend(q.unsqueeze(2), k, v, valid.view(2, 1, 1, 19), 0.25)
    want_out, want_attn = decode_attention_reference(q, k, v, 0.25, valid)
    assert_close(out[:, 0], want_out, 1e-6, 1e-6, name="out")
    assert_close(group_mean(probs[:, :, :, 0]), want_attn, 1e-7, 1e-6, name="attn")


def test_import_and_fallback_without_triton():
    """With triton unimportable, momentkv imports, triton_available() is False and the wrapper still works."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # what Python does for a module that must not import\n"
        "import torch, momentkv\n"
        "from momentkv.kernels import fused_decode_attention, triton_available\n"
        "assert not triton_available()\n"
        "q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 3, 8)\n"
        "out, attn = fused_decode_attention(q, k, k, 1.0)\n"
        "assert out.shape == (1, 4, 8) and attn.shape == (1, 2, 3)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- kernel
#
# On CUDA the kernel runs in this process. Without CUDA it runs under triton's interpreter, which only works
# when TRITON_INTERPRET=1 is set before triton is first imported, and importing momentkv (via transformers and
# torch) already imports triton. So one subprocess, started with the variable set, runs this file as a worker
# that executes every kernel case and saves the results; the tests below compare them with the reference here.

# (batch, heads, kv_heads, S, head_dim, mask, block_n, num_splits): odd lengths, every group size, a prefix
# long enough that whole splits see only masked keys, several tiles per split.
CASES = [
    (1, 1, 1, 1, 16, "none", None, None),
    (2, 4, 2, 5, 16, "random", None, None),
    (3, 8, 2, 123, 64, "prefix", 32, 3),
    (1, 4, 4, 257, 64, "random", 32, 4),
    (2, 8, 2, 257, 16, "prefix+random", 32, 5),
    (1, 2, 1, 123, 16, "none", 16, 2),
]
# Soft-capping and sinks: several splits and tiles, a masked prefix that leaves whole splits without a valid
# key; the strided inputs below add a fully masked batch row.
FEATURE_CASES = [
    (2, 8, 2, 123, 16, "prefix+random", 16, 3),
    (1, 4, 4, 257, 64, "random", 32, 4),
]
FEATURE_DTYPES = [torch.float32, torch.bfloat16]
GPU_CASES = [
    (1, 32, 8, 4133, 128, "prefix+random", None, None),  # launch heuristics, many splits
    (2, 32, 8, 20001, 128, "random", None, None),
]


def case_id(case) -> str:
    return "b{}h{}kv{}s{}d{}-{}".format(*case[:6])


def dtype_id(dtype) -> str:
    return str(dtype).split(".")[-1]


def case_inputs(case, dtype, device=DEVICE):
    b, h, kv, s, d, mask, _, _ = case
    return make_inputs(b, h, kv, s, d, dtype, mask, seed=s, device=device)


def strided_inputs(dtype, device=DEVICE):
    """Views with unusual strides (as a token-major cache would give) and a batch row with every key masked."""
    b, h, kv, s, d = 2, 4, 2, 37, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, 1, d, generator=g).to(device, dtype)[:, :, 0]  # a slice of the model's (b, H, 1, d)
    k = torch.randn(b, s, kv, d, generator=g).to(device, dtype).transpose(1, 2)  # (b, kv, S, d), token-major
    v = torch.randn(b, s, kv, d, generator=g).to(device, dtype).transpose(1, 2)
    valid = (torch.rand(b, s, generator=g) > 0.4).to(device)
    valid[1] = False
    return q, k, v, valid


def run_kernel_cases(kernel, dtypes, cases, feature_dtypes=(), feature_cases=()) -> dict:
    """Every kernel result the tests check, keyed by test id, on the CPU."""
    results = {}
    for dtype in feature_dtypes:
        for feature in FEATURES:
            for case in feature_cases:
                q, k, v, valid = case_inputs(case, dtype)
                out, attn = kernel(q, k, v, FEATURE_SCALING, valid, block_n=case[6], num_splits=case[7],
                                   **feature_kwargs(feature, case[1]))
                results[f"{feature}-{case_id(case)}-{dtype_id(dtype)}"] = {"out": out.cpu(), "attn": attn.cpu()}
            q, k, v, valid = strided_inputs(dtype)
            out, attn = kernel(q, k, v, FEATURE_SCALING, valid, block_n=16, num_splits=2,
                               **feature_kwargs(feature, q.shape[1]))
            results[f"{feature}-strided-{dtype_id(dtype)}"] = {"out": out.cpu(), "attn": attn.cpu()}
    for dtype in dtypes:
        for case in cases:
            q, k, v, valid = case_inputs(case, dtype)
            out, attn = kernel(q, k, v, case[4] ** -0.5, valid, block_n=case[6], num_splits=case[7])
            results[f"{case_id(case)}-{dtype_id(dtype)}"] = {"out": out.cpu(), "attn": attn.cpu()}
        q, k, v, valid = strided_inputs(dtype)
        out, attn = kernel(q, k, v, 0.25, valid, block_n=16, num_splits=2)
        results[f"strided-{dtype_id(dtype)}"] = {"out": out.cpu(), "attn": attn.cpu()}
    return results


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if CUDA:
        from momentkv.kernels.triton_decode import decode_attention_triton

        return run_kernel_cases(decode_attention_triton, DTYPES, CASES + GPU_CASES, FEATURE_DTYPES, FEATURE_CASES)
    path = tmp_path_factory.mktemp("kernels") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__, "--interpreter-worker", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return torch.load(path)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES + (GPU_CASES if CUDA else []), ids=case_id)
def test_kernel_matches_reference(kernel_results, dtype, case):
    got = kernel_results[f"{case_id(case)}-{dtype_id(dtype)}"]
    q, k, v, valid = case_inputs(case, dtype)
    out, attn = decode_attention_reference(q, k, v, case[4] ** -0.5, valid)
    assert got["out"].dtype == dtype and got["attn"].dtype == torch.float32
    assert_close(got["out"], out, *OUT_TOL[dtype], name="out")
    assert_close(got["attn"], attn, *ATTN_TOL[dtype], name="attn")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_fully_masked_row_and_strided_inputs(kernel_results, dtype):
    got = kernel_results[f"strided-{dtype_id(dtype)}"]
    q, k, v, valid = strided_inputs(dtype)
    out, attn = decode_attention_reference(q, k, v, 0.25, valid)
    assert (got["out"][1] == 0).all() and (got["attn"][1] == 0).all()
    assert_close(got["out"], out, *OUT_TOL[dtype], name="out")
    assert_close(got["attn"], attn, *ATTN_TOL[dtype], name="attn")


def without(kwargs: dict, name: str) -> dict:
    return {k: v for k, v in kwargs.items() if k != name}


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FEATURE_CASES + ["strided"], ids=lambda c: c if isinstance(c, str) else case_id(c))
@pytest.mark.parametrize("feature", FEATURES)
def test_kernel_softcap_and_sinks_match_reference(kernel_results, feature, case, dtype):
    if case == "strided":
        got = kernel_results[f"{feature}-strided-{dtype_id(dtype)}"]
        q, k, v, valid = strided_inputs(dtype)
    else:
        got = kernel_results[f"{feature}-{case_id(case)}-{dtype_id(dtype)}"]
        q, k, v, valid = case_inputs(case, dtype)
    kwargs = feature_kwargs(feature, q.shape[1])
    out, attn = decode_attention_reference(q, k, v, FEATURE_SCALING, valid, **kwargs)
    assert got["out"].dtype == dtype and got["attn"].dtype == torch.float32
    assert_close(got["out"], out, *OUT_TOL[dtype], name="out")
    assert_close(got["attn"], attn, *ATTN_TOL[dtype], name="attn")
    if case == "strided":  # a batch row with every key masked: zeros, sinks or not
        assert (got["out"][1] == 0).all() and (got["attn"][1] == 0).all()
    # A kernel that ignored the cap or the sinks would fail the comparison above: dropping either from the
    # reference moves the results past the tolerances.
    for name in kwargs:
        _, attn_without = decode_attention_reference(q, k, v, FEATURE_SCALING, valid, **without(kwargs, name))
        with pytest.raises(AssertionError):
            assert_close(got["attn"], attn_without, *ATTN_TOL[dtype], name=f"attn without {name}")


@pytest.mark.skipif(not CUDA, reason="dispatch to Triton needs CUDA tensors")
def test_wrapper_dispatches_to_triton_on_cuda():
    from momentkv.kernels import triton_decode

    assert triton_available()
    q, k, v, valid = make_inputs(1, 8, 2, 300, 64, torch.bfloat16, "random")
    calls = []
    original = triton_decode.decode_attention_triton
    triton_decode.decode_attention_triton = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        out, attn = fused_decode_attention(q, k, v, 0.125, valid)
    finally:
        triton_decode.decode_attention_triton = original
    assert calls, "the wrapper did not call the Triton kernel"
    want_out, want_attn = decode_attention_reference(q, k, v, 0.125, valid)
    assert_close(out, want_out, *OUT_TOL[torch.bfloat16], name="out")
    assert_close(attn, want_attn, *ATTN_TOL[torch.bfloat16], name="attn")


if __name__ == "__main__" and sys.argv[1:2] == ["--interpreter-worker"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker needs TRITON_INTERPRET=1 set before start"
    from momentkv.kernels.triton_decode import decode_attention_triton

    torch.save(run_kernel_cases(decode_attention_triton, DTYPES, CASES, FEATURE_DTYPES, FEATURE_CASES), sys.argv[2])
