"""The native paged cache write (momentkv/core/paged_write.cpp) against indexed tensor stores: the same bits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from momentkv.core import native_build, paged_write


def _needs_compiler() -> None:
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine: decode tokens are written by tensor stores")


def _layout(cache: torch.Tensor, head_size: int, transposed: bool):
    """Keys and values of ``cache`` ``(blocks, heads, block_size, 2 * head_size)`` as the packing lays them."""
    blocks, heads, bs, _ = cache.shape
    halves = cache.view(blocks, heads, 2, bs * head_size)
    keys = halves[:, :, 0].view(blocks, heads, *((head_size, bs) if transposed else (bs, head_size)))
    return keys, halves[:, :, 1].view(blocks, heads, bs, head_size)


def _case(seed: int, blocks: int, heads: int, bs: int, d: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(blocks, heads, bs, 2 * d, generator=g)
    num_slots = blocks * bs
    key = torch.randn(rows + 3, 2 * heads, d, generator=g)[:, ::2]  # heads strided, as a split of qkv can be
    value = torch.randn(rows + 3, heads, d, generator=g)
    tokens = torch.randperm(rows + 3, generator=g)[:rows]
    # distinct slots per head (requests own distinct slots)
    slots = torch.stack([torch.randperm(num_slots, generator=g)[:rows] for _ in range(heads)], dim=1)
    positions = torch.randint(0, 1000, (num_slots, heads), generator=g)
    now = torch.randint(1000, 2000, (rows,), generator=g)
    pools = [torch.rand(num_slots, heads, generator=g), torch.rand(2, num_slots, heads, generator=g)]
    return cache, key, value, tokens, slots, positions, now, pools


def _reference(cache, key, value, tokens, slots, positions, now, pools, d, transposed):
    keys, values = _layout(cache, d, transposed)
    bs = cache.shape[2]
    heads = torch.arange(slots.shape[1]).expand_as(slots)
    blocks, offsets = slots // bs, slots % bs
    if transposed:
        keys[blocks, heads, :, offsets] = key[tokens]
    else:
        keys[blocks, heads, offsets] = key[tokens]
    values[blocks, heads, offsets] = value[tokens]
    positions[slots, heads] = now.unsqueeze(1)
    for pool in pools:
        pool[..., slots, heads] = 0.0


@settings(max_examples=30, deadline=None)
@given(transposed=st.booleans(), bs=st.sampled_from([8, 16, 32]), d=st.sampled_from([16, 64]),
       heads=st.integers(1, 4), rows=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_the_native_write_stores_the_bits_the_tensor_stores_store(transposed, bs, d, heads, rows, seed):
    _needs_compiler()
    case = _case(seed, 5, heads, bs, d, rows)
    expected = [t.clone() if isinstance(t, torch.Tensor) else [p.clone() for p in t] for t in case]
    _reference(*expected, d, transposed)
    cache, key, value, tokens, slots, positions, now, pools = case
    assert paged_write.PagedWrite(bs, d, transposed)(cache, key, value, tokens, slots, positions, now, pools), \
        paged_write.LIBRARY.failure()
    assert torch.equal(cache, expected[0])
    assert torch.equal(positions, expected[5])
    assert all(torch.equal(p, q) for p, q in zip(pools, expected[7]))


def test_the_wrong_packing_lands_elsewhere():
    """The packing matters: written as row-major, the transposed reading of the cache differs."""
    _needs_compiler()
    case = _case(3, 4, 2, 16, 16, 3)
    expected = [t.clone() if isinstance(t, torch.Tensor) else [p.clone() for p in t] for t in case]
    _reference(*expected, 16, True)
    assert paged_write.PagedWrite(16, 16, False)(*case)
    assert not torch.equal(case[0], expected[0])


def test_indices_outside_the_tensors_are_refused_before_anything_is_written():
    _needs_compiler()
    cache, key, value, tokens, slots, positions, now, pools = _case(5, 4, 2, 16, 16, 3)
    before = cache.clone()
    writer = paged_write.PagedWrite(16, 16, True)
    bad = slots.clone()
    bad[-1, -1] = cache.shape[0] * 16
    with pytest.raises(ValueError, match="outside"):
        writer(cache, key, value, tokens, bad, positions, now, pools)
    with pytest.raises(ValueError, match="outside"):
        writer(cache, key, value, tokens + key.shape[0], slots, positions, now, pools)
    assert torch.equal(cache, before)


def test_tensors_it_does_not_take_are_left_to_the_caller():
    _needs_compiler()
    cache, key, value, tokens, slots, positions, now, pools = _case(7, 4, 2, 16, 16, 3)
    before = cache.clone()
    writer = paged_write.PagedWrite(16, 16, True)
    assert not writer(cache.double(), key, value, tokens, slots, positions, now, pools)
    assert not writer(cache, key.half(), value, tokens, slots, positions, now, pools)
    assert not writer(cache, key, value, tokens, slots.t().contiguous().t(), positions, now, pools)
    assert not writer(cache, key, value, tokens, slots, positions, now, [pools[0].t()])
    assert torch.equal(cache, before)


def test_the_setting_turns_it_off(monkeypatch):
    monkeypatch.setattr(native_build, "_SETTING", "0")
    assert not paged_write.PagedWrite(16, 16, True)(*_case(9, 4, 2, 16, 16, 3))
