"""The native paged attention for scorers (momentkv/core/paged_probs.cpp) against a float64 computation.

Keys lie in blocks scattered through a pool, in either packing a serving engine uses (row-major or transposed per
block); each row's probabilities over its stored tokens, averaged over each KV head's query group, are compared
at the scored slots with the float64 softmax of the same keys gathered in order, within the worst-case rounding
bound of the computation (tests/accuracy.py: logits, exp, sum, normalisation, group mean), not within another
implementation's rounding. A wrong block, head, scale or slot moves probabilities far past that bound.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from momentkv.core import native_build, native_scoring, paged_probs
from momentkv.core.group_attention import group_attention
from tests.accuracy import (assert_within_bound, attention_error_bounds, attention_reference, excess,
                            group_mean_bound)


def _needs_compiler() -> None:
    if native_scoring._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the scorers' attention runs as tensor operations")


def _case(seed: int, *, transposed: bool, block_size: int, head_size: int, kv_heads: int, groups: int, rows: int,
          spread: float = 1.0):
    """A pool of blocks, rows with random block tables, context lengths and scored spans."""
    g = torch.Generator().manual_seed(seed)
    pool = 3 * rows * 4 + 2
    cache = torch.randn(pool, kv_heads, block_size, 2 * head_size, generator=g) * spread
    tokens_total = rows + 3
    query = torch.randn(tokens_total, kv_heads * groups, head_size, generator=g) * spread
    tokens = torch.randperm(tokens_total, generator=g)[:rows]
    held = int(torch.randint(1, 3 * block_size, (1,), generator=g))
    first = torch.randint(0, 2 * block_size, (rows,), generator=g)
    lengths = first + held + torch.randint(0, 2, (rows,), generator=g) * torch.randint(0, block_size, (rows,),
                                                                                           generator=g)
    width = int((lengths.max() + block_size - 1) // block_size)
    blocks = torch.stack([torch.randperm(pool, generator=g)[:width] for _ in range(rows)])
    return cache, query, tokens, blocks, lengths, first, held


def _over_cases(test):
    """``test`` as a property over :func:`_case`'s arguments: both packings, block sizes 8-128, head sizes, 1-8
    query heads per KV head, 1-6 rows, spreads of the inputs."""
    return settings(max_examples=25, deadline=None)(given(
        seed=st.integers(0, 2**31 - 1), transposed=st.booleans(), block_size=st.sampled_from([8, 16, 32, 128]),
        head_size=st.sampled_from([16, 64]), kv_heads=st.integers(1, 3), groups=st.integers(1, 8),
        rows=st.integers(1, 6), spread=st.sampled_from([0.5, 1.0, 3.0]))(test))


def _keys_in_order(cache, blocks, transposed: bool, block_size: int, head_size: int) -> torch.Tensor:
    """``(rows, kv_heads, width * block_size, head_size)`` keys of each row's blocks, in physical order."""
    pool, kv_heads = cache.shape[:2]
    keys = cache.reshape(pool, kv_heads, 2, block_size * head_size)[:, :, 0]
    keys = (keys.view(pool, kv_heads, head_size, block_size).transpose(2, 3) if transposed
            else keys.view(pool, kv_heads, block_size, head_size))
    rows, width = blocks.shape
    return keys[blocks].permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, width * block_size, head_size)


def _expected(cache, query, tokens, blocks, lengths, first, held, scale, transposed, block_size, head_size, groups):
    """float64 reference and bound, ``(rows, kv_heads, held)`` each."""
    keys = _keys_in_order(cache, blocks, transposed, block_size, head_size)
    q = query[tokens].unsqueeze(2)  # (rows, heads, 1, d)
    mask = (torch.arange(keys.shape[2]) < lengths.unsqueeze(1)).view(len(tokens), 1, 1, -1)
    _, prob_bound = attention_error_bounds(q, keys, keys, mask, scale, torch.float32)
    _, probs = attention_reference(q, keys, keys, mask, scale)
    mean, bound = group_mean_bound(probs[:, :, 0], prob_bound[:, :, 0], groups)
    index = (first.unsqueeze(1) + torch.arange(held)).unsqueeze(1).expand(-1, mean.shape[1], -1)
    return mean.gather(-1, index), bound.gather(-1, index)


def _values_in_order(cache, blocks, block_size: int, head_size: int) -> torch.Tensor:
    """``(rows, kv_heads, width * block_size, head_size)`` values of each row's blocks, in physical order."""
    pool, kv_heads = cache.shape[:2]
    values = cache.reshape(pool, kv_heads, 2, block_size * head_size)[:, :, 1].view(pool, kv_heads, block_size,
                                                                                    head_size)
    rows, width = blocks.shape
    return values[blocks].permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, width * block_size, head_size)


@_over_cases
def test_probabilities_and_output_match_float64_within_the_rounding_bound(seed, transposed, block_size, head_size,
                                                                          kv_heads, groups, rows, spread):
    """The scored slots' probabilities, averaged over each group, within the bound of their computation; asked for
    it, the same call writes the decode attention's output for its rows (every query head, over the row's stored
    keys and values) within the bound of softmax attention, other tokens' rows stay as they were, and the
    probabilities are those of the call without an output, bit for bit."""
    _needs_compiler()
    cache, query, tokens, blocks, lengths, first, held = _case(
        seed, transposed=transposed, block_size=block_size, head_size=head_size, kv_heads=kv_heads, groups=groups,
        rows=rows, spread=spread)
    scale = head_size ** -0.5
    native = paged_probs.PagedProbs(block_size, head_size, transposed)
    output = torch.full_like(query, 7.0)
    got = native(cache, query, tokens, blocks, lengths, first, held, scale, output=output)
    assert got is not None, paged_probs.LIBRARY.failure()
    assert torch.equal(got, native(cache, query, tokens, blocks, lengths, first, held, scale))
    expected, bound = _expected(cache, query, tokens, blocks, lengths, first, held, scale, transposed, block_size,
                                head_size, groups)
    assert_within_bound(got, expected, bound, "paged probabilities")
    keys = _keys_in_order(cache, blocks, transposed, block_size, head_size)
    values = _values_in_order(cache, blocks, block_size, head_size)
    q = query[tokens].unsqueeze(2)  # (rows, heads, 1, d)
    mask = (torch.arange(keys.shape[2]) < lengths.unsqueeze(1)).view(len(tokens), 1, 1, -1)
    expected, _ = attention_reference(q, keys, values, mask, scale)  # (rows, 1, heads, d)
    bound, _ = attention_error_bounds(q, keys, values, mask, scale, torch.float32)
    assert_within_bound(output[tokens], expected[:, 0], bound[:, 0], "paged attention output")
    untouched = torch.ones(query.shape[0], dtype=torch.bool)
    untouched[tokens] = False
    assert bool((output[untouched] == 7.0).all())


@pytest.mark.parametrize("fault", ["block", "values"])
def test_a_planted_fault_in_the_output_breaks_the_bound(fault):
    """A wrong block, or values other than the ones stored (here: the reference's values rolled by one token),
    moves the output far past the bound the test allows."""
    _needs_compiler()
    bs, d = 16, 64
    cache, query, tokens, blocks, lengths, first, held = _case(5, transposed=True, block_size=bs, head_size=d,
                                                               kv_heads=2, groups=2, rows=4, spread=2.0)
    keys = _keys_in_order(cache, blocks, True, bs, d)
    values = _values_in_order(cache, blocks, bs, d)
    q = query[tokens].unsqueeze(2)
    mask = (torch.arange(keys.shape[2]) < lengths.unsqueeze(1)).view(len(tokens), 1, 1, -1)
    reference_values = values.roll(1, dims=2) if fault == "values" else values
    expected, _ = attention_reference(q, keys, reference_values, mask, d ** -0.5)
    bound, _ = attention_error_bounds(q, keys, values, mask, d ** -0.5, torch.float32)
    table = torch.cat([blocks[:, :1].roll(1, 0), blocks[:, 1:]], dim=1) if fault == "block" else blocks
    output = torch.zeros_like(query)
    assert paged_probs.PagedProbs(bs, d, True)(cache, query, tokens, table, lengths, first, held, d ** -0.5,
                                               output=output) is not None
    assert excess(output[tokens], expected[:, 0], bound[:, 0]) > 100


def test_an_output_it_cannot_write_leaves_the_call_to_the_caller():
    """An output that is not float32 rows of the query's shape: nothing is computed, nothing written."""
    _needs_compiler()
    cache, query, tokens, blocks, lengths, first, held = _case(3, transposed=False, block_size=16, head_size=16,
                                                               kv_heads=2, groups=2, rows=3)
    native = paged_probs.PagedProbs(16, 16, False)
    for output in (torch.zeros_like(query, dtype=torch.float64), torch.zeros(query.shape[0], query.shape[1], 8),
                   torch.zeros_like(query).transpose(1, 2).contiguous().transpose(1, 2)):
        before = output.clone()
        assert native(cache, query, tokens, blocks, lengths, first, held, 0.25, output=output) is None
        assert torch.equal(output, before)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_tensor_path_of_the_same_view_agrees(transposed):
    """The gathered-keys tensor path (what a caller falls back to) is within the same bound: the two are
    interchangeable up to rounding."""
    _needs_compiler()
    bs, d, kv, groups = 32, 64, 3, 3
    cache, query, tokens, blocks, lengths, first, held = _case(
        7, transposed=transposed, block_size=bs, head_size=d, kv_heads=kv, groups=groups, rows=5)
    keys = _keys_in_order(cache, blocks, transposed, bs, d)
    mask = (torch.arange(keys.shape[2]) < lengths.unsqueeze(1)).view(len(tokens), 1, 1, -1)
    probs = group_attention(query[tokens].unsqueeze(2), keys, mask, d ** -0.5)
    index = (first.unsqueeze(1) + torch.arange(held)).unsqueeze(1).expand(-1, kv, -1)
    tensor_path = probs.gather(-1, index)
    expected, bound = _expected(cache, query, tokens, blocks, lengths, first, held, d ** -0.5, transposed, bs, d,
                                groups)
    native = paged_probs.PagedProbs(bs, d, transposed)(cache, query, tokens, blocks, lengths, first, held, d ** -0.5)
    assert_within_bound(tensor_path, expected, bound, "tensor path")
    assert_within_bound(native, expected, bound, "native")


@pytest.mark.parametrize("fault", ["block", "head", "scale", "slot", "packing"])
def test_a_planted_fault_breaks_the_bound(fault):
    _needs_compiler()
    bs, d, kv, groups = 16, 64, 2, 2
    cache, query, tokens, blocks, lengths, first, held = _case(
        3, transposed=True, block_size=bs, head_size=d, kv_heads=kv, groups=groups, rows=4, spread=2.0)
    expected, bound = _expected(cache, query, tokens, blocks, lengths, first, held, d ** -0.5, True, bs, d, groups)
    args = {"blocks": blocks, "query": query, "scale": d ** -0.5, "first": first, "lengths": lengths,
            "transposed": True}
    if fault == "block":
        args["blocks"] = torch.cat([blocks[:, :1].roll(1, 0), blocks[:, 1:]], dim=1)
    elif fault == "head":
        args["query"] = query.flip(1)
    elif fault == "scale":
        args["scale"] = d ** -0.5 * 1.1
    elif fault == "slot":
        args["first"], args["lengths"] = first + 1, lengths + 1
    else:
        args["transposed"] = False
    got = paged_probs.PagedProbs(bs, d, args["transposed"])(cache, args["query"], tokens, args["blocks"],
                                                            args["lengths"], args["first"], held, args["scale"])
    assert excess(got, expected, bound) > 100


def test_rows_far_below_their_max_underflow_to_zero_within_the_bound():
    """Logits spread over hundreds: most probabilities underflow, the largest still sum to about one."""
    _needs_compiler()
    bs, d = 16, 16
    cache, query, tokens, blocks, lengths, first, held = _case(
        11, transposed=False, block_size=bs, head_size=d, kv_heads=1, groups=2, rows=3, spread=12.0)
    got = paged_probs.PagedProbs(bs, d, False)(cache, query, tokens, blocks, lengths, first, held, 1.0)
    expected, bound = _expected(cache, query, tokens, blocks, lengths, first, held, 1.0, False, bs, d, 2)
    assert float((expected == 0).double().mean()) > 0 or float((expected < 1e-30).double().mean()) > 0.3
    assert_within_bound(got, expected, bound, "underflowing probabilities")


def test_inputs_it_does_not_read_are_left_to_the_caller():
    _needs_compiler()
    cache, query, tokens, blocks, lengths, first, held = _case(
        5, transposed=True, block_size=16, head_size=16, kv_heads=2, groups=2, rows=3)
    native = paged_probs.PagedProbs(16, 16, True)
    assert native(cache.half(), query, tokens, blocks, lengths, first, held, 0.25) is None
    assert native(cache, query.double(), tokens, blocks, lengths, first, held, 0.25) is None
    strided = torch.randn(query.shape[0], query.shape[1], 2 * query.shape[2])[..., ::2]
    assert native(cache, strided, tokens, blocks, lengths, first, held, 0.25) is None
    with pytest.raises(ValueError, match="outside its stored tokens"):
        native(cache, query, tokens, blocks, first + held - 1, first, held, 0.25)
    with pytest.raises(ValueError, match="outside its stored tokens"):  # first + held would overflow int64
        native(cache, query, tokens, blocks, lengths, torch.full_like(first, 2**63 - 1), held, 0.25)
    with pytest.raises(ValueError, match="than its block table holds"):
        native(cache, query, tokens, blocks[:, :1], lengths + 16, first, held, 0.25)


def test_the_setting_turns_it_off(monkeypatch):
    monkeypatch.setattr(native_build, "_SETTING", "0")
    cache, query, tokens, blocks, lengths, first, held = _case(
        5, transposed=True, block_size=16, head_size=16, kv_heads=2, groups=2, rows=3)
    assert paged_probs.PagedProbs(16, 16, True)(cache, query, tokens, blocks, lengths, first, held, 0.25) is None


def test_the_build_is_keyed_by_this_cpu(monkeypatch, tmp_path):
    """Built with -march=native only where the CPU's features key the build: a cache folder shared with another
    CPU must not hand it this build."""
    _needs_compiler()
    features = native_build.cpu_features()
    assert paged_probs.LIBRARY.key_extra == features
    assert ("-march=native" in paged_probs._FLAGS) == bool(features)
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path))
    here = native_build.build("paged_probs.cpp", paged_probs._FLAGS, native_build.compiler(),
                              key_extra=paged_probs.LIBRARY.key_extra)
    other = native_build.build("paged_probs.cpp", paged_probs._FLAGS, native_build.compiler(),
                               key_extra=features + b" another cpu")
    assert here != other and here.is_file() and other.is_file()


def test_indices_outside_the_tensors_are_refused_before_the_native_call():
    _needs_compiler()
    cache, query, tokens, blocks, lengths, first, held = _case(
        5, transposed=True, block_size=16, head_size=16, kv_heads=2, groups=2, rows=3)
    native = paged_probs.PagedProbs(16, 16, True)
    bad = blocks.clone()
    bad[0, 0] = cache.shape[0]
    with pytest.raises(ValueError, match="block id"):
        native(cache, query, tokens, bad, lengths, first, held, 0.25)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="block id"):
        native(cache, query, tokens, bad, lengths, first, held, 0.25)
    with pytest.raises(ValueError, match="query index"):
        native(cache, query, tokens + query.shape[0], blocks, lengths, first, held, 0.25)
    assert native(cache, query, tokens[:2], blocks, lengths, first, held, 0.25) is None  # rows disagree


def test_a_nan_key_makes_its_row_nan_as_torch_does():
    _needs_compiler()
    cache, query, tokens, blocks, lengths, first, held = _case(
        9, transposed=False, block_size=16, head_size=16, kv_heads=1, groups=2, rows=2)
    cache[blocks[0, 0], 0, 0, 0] = float("nan")  # the first key of row 0
    got = paged_probs.PagedProbs(16, 16, False)(cache, query, tokens, blocks, lengths, first, held, 0.25)
    assert bool(got[0].isnan().all()) and not bool(got[1].isnan().any())


def test_a_compiler_without_openmp_builds_the_same_kernel_on_one_thread(monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp (Apple's clang has no OpenMP runtime): the source is built again without
    it, and the one-thread kernel is within the same bound."""
    _needs_compiler()
    real = native_build.compiler()
    fake = tmp_path / "c++"
    log = tmp_path / "calls"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                    "for a in \"$@\"; do [ \"$a\" = -fopenmp ] && { echo 'no OpenMP' >&2; exit 1; }; done\n"
                    f"exec {' '.join(real)} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("MOMENTKV_CACHE_DIR", str(tmp_path / "cache"))
    library = native_build.NativeFunction("paged_probs.cpp", "momentkv_paged_probs", paged_probs._FLAGS, "test",
                                          "test", key_extra=paged_probs.LIBRARY.key_extra)
    with pytest.warns(RuntimeWarning, match="refused OpenMP"):
        assert library.get() is not None, library.failure()
    builds = [line.split() for line in log.read_text().splitlines() if "paged_probs.cpp" in line]
    assert [("-fopenmp" in b, "-fopenmp-simd" in b) for b in builds] == [(True, False), (False, True)]
    # A later process finds the one-thread build and does not try OpenMP again.
    again = native_build.build("paged_probs.cpp", paged_probs._FLAGS, native_build.compiler(),
                               key_extra=paged_probs.LIBRARY.key_extra)
    assert again.is_file()
    assert len([line for line in log.read_text().splitlines() if "paged_probs.cpp" in line]) == 2  # no new build
    monkeypatch.setattr(paged_probs, "LIBRARY", library)
    bs, d, kv, groups = 16, 64, 2, 3
    cache, query, tokens, blocks, lengths, first, held = _case(
        13, transposed=True, block_size=bs, head_size=d, kv_heads=kv, groups=groups, rows=5)
    expected, bound = _expected(cache, query, tokens, blocks, lengths, first, held, d ** -0.5, True, bs, d, groups)
    got = paged_probs.PagedProbs(bs, d, True)(cache, query, tokens, blocks, lengths, first, held, d ** -0.5)
    assert_within_bound(got, expected, bound, "one-thread build")


def test_the_result_does_not_depend_on_the_number_of_threads():
    """Each (row, KV head) pair is computed by one thread: one thread and two give the same bits."""
    _needs_compiler()
    bs, d, kv, groups = 32, 64, 3, 3
    cache, query, tokens, blocks, lengths, first, held = _case(
        17, transposed=True, block_size=bs, head_size=d, kv_heads=kv, groups=groups, rows=7)
    native = paged_probs.PagedProbs(bs, d, True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            output = torch.zeros_like(query)
            results.append((native(cache, query, tokens, blocks, lengths, first, held, d ** -0.5, output), output))
    finally:
        torch.set_num_threads(before)
    (probs_1, out_1), (probs_2, out_2) = results
    assert probs_1 is not None and torch.equal(probs_1, probs_2) and torch.equal(out_1, out_2)
