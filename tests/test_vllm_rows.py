"""The vLLM backend's per-step row tensors (``momentkv.integrations.vllm.rows``), against a slot-by-slot
computation of the layout it documents. Needs no vLLM: block tables are synthetic."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momentkv.integrations.vllm.rows import DecodeBatch


def _slot(table_row: list[int], index: int, block_size: int) -> int:
    return table_row[index // block_size] * block_size + index % block_size


@st.composite
def steps(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    budget = draw(st.integers(1, 12))
    rows = draw(st.integers(1, 6))
    prompt = [draw(st.integers(1, 40)) for _ in range(rows)]
    generated = [draw(st.integers(0, 3 * budget)) for _ in range(rows)]
    width = max(-(-(p + budget) // block_size) for p in prompt) + draw(st.integers(0, 2))
    rng = random.Random(draw(st.integers(0, 2**31)))
    blocks = rng.sample(range(1, rows * width + 50), rows * width)  # distinct, never the null block 0
    table = torch.tensor(blocks).view(rows, width)
    tokens = sorted(rng.sample(range(rows * 3), rows))
    return tokens, prompt, generated, table, budget, block_size


@settings(max_examples=60, deadline=None)
@given(steps(), st.booleans())
def test_the_batch_names_the_documented_slots(step, batched):
    tokens, prompt, generated, table, budget, block_size = step
    batch = DecodeBatch.make(tokens, prompt, generated, table, budget, block_size, batched=batched, attention=True)
    rows = table.tolist()
    full = [g >= budget for g in generated]
    assert batch.tokens.tolist() == tokens
    assert batch.now.tolist() == [p + g for p, g in zip(prompt, generated)]
    for r in range(len(tokens)):
        if not full[r]:  # a full row's next index lies past its blocks: it writes into a victim's slot
            assert int(batch.next_slot[r]) == _slot(rows[r], prompt[r] + generated[r], block_size)

    ranked = [int(r) for group in batch.victims for r in group.rows]
    assert sorted(ranked) == [r for r in range(len(tokens)) if full[r]]
    for group in batch.victims:
        for i, r in enumerate(group.rows.tolist()):
            assert group.table[i].tolist() == [_slot(rows[r], prompt[r] + j, block_size) for j in range(budget)]
            assert int(group.prompt[i, 0, 0]) == prompt[r]
            newest = group.newest if isinstance(group.newest, int) else int(group.newest[i, 0, 0])
            assert newest == prompt[r] + generated[r] - 1

    folded = [int(r) for group in batch.folds for r in group.rows]
    assert sorted(folded) == list(range(len(tokens)))  # every row folded once
    for group in batch.folds:
        n = len(group.rows)
        assert batched or n == 1
        for i, r in enumerate(group.rows.tolist()):
            held = min(generated[r] + 1, budget)
            assert group.held == held
            assert group.table[i].tolist() == [_slot(rows[r], prompt[r] + j, block_size) for j in range(held)]
            now = group.now if isinstance(group.now, int) else int(group.now[i, 0, 0])
            assert now == prompt[r] + generated[r]
            assert int(group.tokens[i]) == tokens[r]
            # The attention's key slots: the group's blocks, in order; the mask marks exactly the stored tokens;
            # the generated tokens sit at P .. P+held-1 of them.
            stored = [b * block_size + o for b in group.blocks[i].tolist() for o in range(block_size)]
            mask = group.mask[i, 0, 0].tolist()
            assert [s for s, m in zip(stored, mask) if m] == [_slot(rows[r], j, block_size)
                                                            for j in range(prompt[r] + held)]
            assert [stored[j] for j in group.generated[i, 0].tolist()] == group.table[i].tolist()


def test_unbatched_groups_give_an_int_now():
    batch = DecodeBatch.make([0, 1], [3, 5], [4, 0], torch.tensor([[1, 2, 3], [4, 5, 6]]), budget=2, block_size=4,
                             batched=False, attention=False)
    assert len(batch.victims) == 1 and len(batch.folds) == 2
    assert all(isinstance(g.now, int) for g in batch.folds) and all(isinstance(g.newest, int) for g in batch.victims)
    assert all(g.blocks is None and g.mask is None for g in batch.folds)  # no attention scorer: none built


@settings(max_examples=20, deadline=None)
@given(steps(), st.booleans())
def test_a_batch_moves_to_the_cache_device_whole(step, batched):
    """A GPU engine's layers index its cache on the GPU: every tensor of the batch moves, nothing else changes.
    (The ``meta`` device stands for a GPU here: it keeps shapes and dtypes and holds no data.)"""
    batch = DecodeBatch.make(*step, batched=batched, attention=True)
    assert batch.to("cpu") is batch
    moved = batch.to("meta")

    def tensors(value, path="batch"):
        if isinstance(value, torch.Tensor):
            yield path, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from tensors(v, f"{path}[{i}]")
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                yield from tensors(getattr(value, name), f"{path}.{name}")

    before, after = dict(tensors(batch)), dict(tensors(moved))
    assert before.keys() == after.keys() and before
    for path, tensor in after.items():
        assert tensor.device.type == "meta", path
        assert (tensor.shape, tensor.dtype) == (before[path].shape, before[path].dtype), path
    for old, new in zip(batch.folds, moved.folds):
        assert (new.held, type(new.now)) == (old.held, type(old.now))
        if isinstance(old.now, int):
            assert new.now == old.now and new.prompt == old.prompt
