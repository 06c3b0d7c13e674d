"""The eviction core: engine-agnostic (no transformers), and indifferent to where a slot lives."""

import subprocess
import sys
import textwrap

import pytest
import torch

from momentkv.core.eviction import LayerEviction
from momentkv.core.paged import PagedStates
from momentkv.core.plan import build_plans
from momentkv.policy import load_policy
from momentkv.scoring.base import ScoreContext


def test_the_core_imports_and_runs_without_transformers():
    """A serving engine pins its own transformers: the core must not need one at all."""
    script = textwrap.dedent("""
        import sys
        class NoTransformers:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is not available")
                return None
        sys.meta_path.insert(0, NoTransformers())
        import torch
        from momentkv.core.eviction import LayerEviction
        from momentkv.core.plan import build_plans
        from momentkv.core.paged import PagedStates
        from momentkv.policy import load_policy
        from momentkv.scoring.base import ScoreContext
        plan = build_plans(load_policy("moment.yaml"), 1, [None])[0]
        core = LayerEviction(plan)
        b, h, t = 1, 2, plan.budget
        core.scoring.start(b, h, t, "cpu")
        view = ScoreContext(None, torch.randn(b, h, t, 4), None, positions=torch.arange(t).expand(b, h, t),
                            now=t - 1)
        core.fold(torch.rand(b, h, t), view)
        assert core.evictions_needed(t, t, 1, True) == 1
        print(tuple(core.lowest(view, 0).shape), "transformers" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(1,", "2,", "1)", "False"]


def _attention(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each token's attention at this step, a function of its sequence index: ``(b, h, T)``."""
    return table.gather(-1, positions)


# raas.yaml: a scorer whose state has two channels (a pool of (2, slots, heads)).
@pytest.mark.parametrize("policy", ["moment.yaml", "h2o.yaml", "tova.yaml", "keydiff.yaml", "raas.yaml"])
def test_paged_states_evict_what_dense_slots_evict(policy):
    """The same tokens through the core twice: once in contiguous slots (the transformers layer's layout), once
    scattered over a pool by a block table with states paged alike (a serving engine's). Every step evicts
    the same token in every (row, KV head), and the states end equal token by token."""
    plan = build_plans(load_policy({"extends": policy, "decode": {"budget": 8}}), 1, [None])[0]
    b, h, d, t, steps, pool = 2, 2, 4, plan.budget, 30, 64
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(b, h, t + steps, d, generator=g)  # every token's key, by sequence index
    weights = torch.rand(steps, b, h, t + steps, generator=g)  # each step's attention, by sequence index
    # Dense: slot j holds token j at first.
    dense = LayerEviction(plan)
    dense.scoring.start(b, h, t, "cpu")
    d_pos = torch.arange(t).expand(b, h, t).clone()
    d_keys = keys[:, :, :t].clone()
    # Paged: row r's slots are table[r], scattered over the pool in an arbitrary order.
    table = torch.stack([torch.randperm(pool, generator=g)[:t] for _ in range(b)])  # (b, T)
    p_keys = torch.zeros(pool, h, d)
    p_pos = torch.zeros(pool, h, dtype=torch.long)
    for r in range(b):
        p_keys[table[r]] = keys[r, :, :t].transpose(0, 1)
        p_pos[table[r]] = torch.arange(t).unsqueeze(1).expand(t, h)
    paged, states = LayerEviction(plan), PagedStates([s.state_channels for s in plan.scorers], pool, h)

    def paged_view(now):
        k, pos = p_keys[table].permute(0, 2, 1, 3), p_pos[table].transpose(1, 2)  # (b, h, T, d), (b, h, T)
        return ScoreContext(None, k, None, positions=pos, values=k, now=now)

    for step in range(steps):
        seen = t + step
        new_key = keys[:, :, seen : seen + 1]
        # dense
        view = ScoreContext(None, d_keys, None, positions=d_pos, values=d_keys, now=seen - 1)
        assert dense.evictions_needed(t, seen, 1, True) == 1
        slot = dense.lowest(view, 0)  # (b, h, 1)
        victim = d_pos.gather(-1, slot)
        d_keys.scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, d), new_key)
        d_pos.scatter_(2, slot, seen)
        dense.scoring.reset_slot(slot)
        view = ScoreContext(None, d_keys, None, positions=d_pos, values=d_keys, now=seen)
        dense.fold(_attention(weights[step], d_pos), view)
        # paged
        states.load(paged.scoring, table)
        slot = paged.lowest(paged_view(seen - 1), 0)
        where = table.unsqueeze(1).expand(b, h, t).gather(-1, slot).squeeze(-1)  # (b, h) pool slot per head
        assert torch.equal(p_pos[where, torch.arange(h)].unsqueeze(-1), victim), step
        p_keys[where, torch.arange(h)] = new_key.squeeze(2)
        p_pos[where, torch.arange(h)] = seen
        paged.scoring.reset_slot(slot)
        view = paged_view(seen)
        paged.fold(_attention(weights[step], view.positions), view)
        states.store(paged.scoring, table)
    # The states agree token by token (sorted by sequence index in both layouts).
    order_d = d_pos.argsort(-1)
    p_view = paged_view(seen)
    order_p = p_view.positions.argsort(-1)
    assert torch.equal(d_pos.gather(-1, order_d), p_view.positions.gather(-1, order_p))
    for mine, theirs in zip(dense.scoring.states, states.gather(table)):
        torch.testing.assert_close(mine.gather(-1, order_d.expand_as(mine)), theirs.gather(-1, order_p.expand_as(theirs)),
                                   rtol=0, atol=0)


def _filled_states(plan, pool: int, h: int, seed: int) -> PagedStates:
    g = torch.Generator().manual_seed(seed)
    states = PagedStates([s.state_channels for s in plan.scorers], pool, h)
    for p in states.pools:
        p.copy_((torch.rand(p.shape, generator=g) * 4).floor() / 4)  # ties
    return states


@pytest.mark.parametrize("policy", ["moment.yaml", "h2o.yaml", "recency.yaml"])
def test_the_steady_fold_in_place_equals_load_fold_store(policy):
    """A paged engine's steady fold on the pools where they lie (PagedStates.fold_in_place) leaves the pools and the
    stored totals as gathering, folding (LayerEviction.fold) and storing back does, and names the same victims."""
    plan = build_plans(load_policy({"extends": policy, "decode": {"budget": 8}}), 1, [None])[0]
    b, h, t, pool = 3, 2, plan.budget, 40
    g = torch.Generator().manual_seed(1)
    table = torch.randperm(pool, generator=g)[: b * t].view(b, t)  # (b, T): requests own distinct slots
    now = torch.tensor([30, 41, 52]).view(b, 1, 1)
    prompt = torch.tensor([3, 5, 7]).view(b, 1, 1)
    positions = torch.zeros(pool, h, dtype=torch.long)
    for r in range(b):
        for head in range(h):
            positions[table[r], head] = torch.randperm(int(now[r]) - int(prompt[r]) + 1, generator=g)[:t] + prompt[r, 0, 0]
    attention = (torch.rand(b, h, t, generator=g) * 4).floor() / 4

    gathered, in_place = _filled_states(plan, pool, h, 2), _filled_states(plan, pool, h, 2)
    core = LayerEviction(plan)
    gathered.load(core.scoring, table)
    view = ScoreContext(None, None, None, positions=gathered.read(positions, table), now=now)
    core.fold(attention, view, prompt)
    gathered.store(core.scoring, table)
    expected = core.named_victim(view)
    assert expected is not None  # the fused step ran

    victim = in_place.fold_in_place(LayerEviction(plan), attention, positions, table, now, prompt)
    assert victim is not None and torch.equal(victim, expected)
    assert all(torch.equal(p, q) for p, q in zip(in_place.pools, gathered.pools))
    assert in_place.has_total and torch.equal(in_place.total, gathered.total)


def test_a_fold_the_pools_cannot_take_in_place_changes_nothing():
    """A table narrower than the budget (a row still filling it), or a scorer with a multi-channel state: ``None``,
    every pool as it was (the caller then loads, folds and stores)."""
    for policy, width in (("moment.yaml", 5), ("raas.yaml", 8)):
        plan = build_plans(load_policy({"extends": policy, "decode": {"budget": 8}}), 1, [None])[0]
        states = _filled_states(plan, 40, 2, 3)
        before = [p.clone() for p in states.pools]
        table = torch.arange(width).view(1, width)
        positions = torch.arange(40).view(40, 1).expand(40, 2).contiguous()
        victim = states.fold_in_place(LayerEviction(plan), torch.rand(1, 2, width), positions, table, 50, 0)
        assert victim is None and not states.has_total
        assert all(torch.equal(p, q) for p, q in zip(states.pools, before))
