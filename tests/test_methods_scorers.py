"""The 2025-26 decode-time scorers compute their published formulas, on hand-built score contexts.

Each reference below is written from the method's formula with plain loops over tokens (no call into the
scorer, no shared helper), on caches whose slots are deliberately out of sequence order, as they are once
eviction has reused slots.

A threshold in a formula (R-KV's near-duplicates, RaaS's hits) is a discontinuity: the references check that
no value of the test data lies within the scorer's float32 rounding of its threshold (:func:`decided`), so
that the comparison holds whatever order or vector path the CPU rounds in.
"""

from __future__ import annotations

import math

import pytest
import torch

import momentkv
from momentkv.policy import load_policy
from momentkv.scoring import (
    EMA, Accumulated, Instantaneous, KeyDiff, LastHit, Peak, Redundancy, ScoreContext,
)
from accuracy import UNIT_ROUNDOFF, gamma

U32 = UNIT_ROUNDOFF[torch.float32]


def decided(value: float, threshold: float, rounding: float) -> bool:
    """``value > threshold``, after checking that the scorer's rounding (``rounding``) cannot decide it."""
    assert abs(value - threshold) > rounding, f"test data ties: {value!r} within {rounding:.3g} of {threshold!r}"
    return value > threshold


def shuffled_positions(batch: int, heads: int, n: int, start: int, seed: int) -> torch.Tensor:
    """``(batch, heads, n)`` distinct positions from ``start``, in a different random slot order per head."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n, generator=g) + start for _ in range(batch * heads)]
    return torch.stack(rows).view(batch, heads, n)


def context(keys=None, attention=None, state=None, positions=None, now=None, valid=None, window=None):
    b, h, n = positions.shape
    if state is None:
        state = torch.zeros((b, h, n))
    return ScoreContext(attention=attention, keys=keys, state=state, positions=positions, now=now, valid=valid,
                        window=window)


# ----------------------------------------------------------------- R-KV's redundancy
def reference_redundancy(keys, positions, threshold, retain, valid=None):
    """R-KV's redundancy per token, one (row, head) at a time, with Python loops over token pairs."""
    b, h, n, _ = keys.shape
    out = torch.zeros(b, h, n)
    for r in range(b):
        for head in range(h):
            idx = [i for i in range(n) if valid is None or bool(valid[r, head, i])]
            k = {i: keys[r, head, i].double() for i in idx}
            sim = {(i, j): 0.0 if i == j else float(k[i] @ k[j] / ((k[i].norm() + 1e-8) * (k[j].norm() + 1e-8)))
                   for i in idx for j in idx}
            # The scorer's float32 cosine: unit vectors (gamma(d)/2 + 3u per component), dotted (gamma(d)).
            rounding = 2 * gamma(keys.shape[-1] + 3, U32)
            for i in idx:
                dups = [j for j in idx if j != i and decided(sim[i, j], threshold, rounding)]
                if dups:
                    pick = max if retain == "last" else min
                    j = pick(dups, key=lambda t: int(positions[r, head, t]))
                    sim[i, j] = 0.0
            means = {j: sum(sim[i, j] for i in idx) / len(idx) for j in idx}
            top = max(means.values())
            z = sum(math.exp(m - top) for m in means.values())
            for j in idx:
                out[r, head, j] = math.exp(means[j] - top) / z
    return out


def keys_with_copies(batch, heads, n, d, seed):
    """Random keys in which a few tokens are near-copies (cosine > 0.9) of others, so the zeroing rule bites."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, d, generator=g)
    for src, dst in [(0, 3), (0, 5), (2, 7), (4, 1)]:
        if max(src, dst) < n:
            keys[..., dst, :] = keys[..., src, :] * 1.3 + 0.1 * torch.randn(batch, heads, d, generator=g)
    return keys


@pytest.mark.parametrize("retain", ["last", "first"])
@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_redundancy_is_rkv_formula(retain, threshold):
    keys = keys_with_copies(2, 3, 11, 8, seed=1)
    positions = shuffled_positions(2, 3, 11, start=20, seed=2)
    scorer = Redundancy(threshold=threshold, retain=retain)
    got = scorer.update(context(keys=keys, positions=positions, now=40))
    torch.testing.assert_close(got, -reference_redundancy(keys, positions, threshold, retain), rtol=0, atol=1e-6)


def test_redundancy_newest_copy_survives():
    """Among copies of one key, the newest copy is the least redundant (retain: last) and the oldest with first."""
    d = 6
    base = torch.randn(d, generator=torch.Generator().manual_seed(0))
    others = torch.randn(5, d, generator=torch.Generator().manual_seed(1))
    keys = torch.cat([base.expand(3, d), others]).view(1, 1, 8, d)  # three exact copies: slots 0, 1, 2
    positions = torch.tensor([[[30, 10, 20, 11, 12, 13, 14, 15]]])  # the copy in slot 0 is the newest
    last = Redundancy(retain="last").update(context(keys=keys, positions=positions, now=30))
    first = Redundancy(retain="first").update(context(keys=keys, positions=positions, now=30))
    assert int(last[0, 0, :3].argmax()) == 0  # -redundancy highest: kept first
    assert int(first[0, 0, :3].argmax()) == 1  # position 10, the oldest copy


def test_redundancy_leaves_padding_out():
    keys = keys_with_copies(1, 2, 9, 4, seed=3)
    positions = shuffled_positions(1, 2, 9, start=0, seed=4)
    valid = torch.ones(1, 2, 9, dtype=torch.bool)
    valid[0, :, [2, 6]] = False
    got = Redundancy().update(context(keys=keys, positions=positions, now=9, valid=valid))
    want = -reference_redundancy(keys, positions, 0.5, "last", valid)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.isfinite(got).all() and bool((got[~valid] == 0).all())


# ----------------------------------------------------------------- KeyDiff
def test_keydiff_is_minus_cosine_to_the_mean_normalised_key():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 9, 8, generator=g) * torch.rand(2, 2, 9, 1, generator=g) * 4
    positions = shuffled_positions(2, 2, 9, start=5, seed=6)
    got = KeyDiff().update(context(keys=keys, positions=positions, now=13))
    want = torch.zeros(2, 2, 9)
    for r in range(2):
        for h in range(2):
            unit = [keys[r, h, i] / keys[r, h, i].norm() for i in range(9)]
            anchor = sum(unit) / 9
            for i in range(9):
                want[r, h, i] = -float(unit[i] @ anchor / anchor.norm())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the anchor ignores padding
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[:, :, 0] = False
    padded = KeyDiff().update(context(keys=keys, positions=positions, now=13, valid=valid))
    alone = KeyDiff().update(context(keys=keys[..., 1:, :], positions=positions[..., 1:], now=13))
    torch.testing.assert_close(padded[..., 1:], alone, rtol=0, atol=1e-6)


# ----------------------------------------------------------------- RaaS and LazyEviction
def test_last_hit_is_least_recently_used_and_recurrence_intervals():
    """A step-by-step reference of RaaS's timestamps and LazyEviction's longest recurrence interval."""
    g = torch.Generator().manual_seed(7)
    n, steps, start = 6, 40, 100
    positions = shuffled_positions(1, 2, n, start=start, seed=8)
    raas, lazy = LastHit(threshold=1.0), LastHit(threshold=1.0, recurrence=True)
    state_raas, state_lazy = torch.zeros(2, 1, 2, n), torch.zeros(2, 1, 2, n)
    last = {(h, i): start + int(positions[0, h, i]) - start for h in range(2) for i in range(n)}
    longest = {(h, i): 0 for h in range(2) for i in range(n)}
    now0 = start + n - 1
    for step in range(steps):
        now = now0 + step
        logits = torch.randn(1, 2, n, generator=g) * 3
        attention = torch.softmax(logits, -1) * 0.7  # the prompt takes the rest
        got_raas = raas.update(context(attention=attention, state=state_raas, positions=positions, now=now))
        got_lazy = lazy.update(context(attention=attention, state=state_lazy, positions=positions, now=now))
        for h in range(2):
            for i in range(n):
                # The scorer compares the same float32 attention with float32(1 / n).
                if decided(float(attention[0, h, i]), 1.0 / n, U32 / n):
                    longest[h, i] = max(longest[h, i], now - last[h, i])
                    last[h, i] = now
                since = now - last[h, i]
                assert float(got_raas[0, h, i]) == -since
                back = since < longest[h, i]
                assert bool(got_lazy[0, h, i] > 0) == back
                if back:
                    assert float(got_lazy[0, h, i]) == now + 1 - since
                else:
                    assert float(got_lazy[0, h, i]) == -since
    assert any(v > 1 for v in longest.values()), "the trace must contain recurrences"


def test_last_hit_absolute_threshold():
    positions = torch.tensor([[[5, 3, 4]]])
    attention = torch.tensor([[[0.002, 0.0005, 0.3]]])
    state = torch.zeros(2, 1, 1, 3)
    got = LastHit(threshold=1e-3, relative=False).update(
        context(attention=attention, state=state, positions=positions, now=9))
    assert got.tolist() == [[[0.0, -6.0, 0.0]]]


# ----------------------------------------------------------------- windowed observation (R-KV, G-KV)
def window_rows(batch, heads, groups, w, n, seed):
    """Synthetic ``window_attention`` rows: softmax rows over ``n`` tokens plus a prompt share."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.softmax(torch.randn(batch, heads, groups, w, n + 4, generator=g) * 2, dim=-1)
    return rows[..., 4:]  # the prompt's 4 keys took part of each row


def reference_window_observation(rows, positions, now, group, rescale):
    """Per (row, head): group reduction per query, then the mean over the queries (R-KV/G-KV order); the
    window's own tokens (age < w) are fresh. Returns (observation, fresh) as dicts keyed by position."""
    b, h, g, w, n = rows.shape
    obs, fresh = {}, {}
    for r in range(b):
        for head in range(h):
            for i in range(n):
                per_query = []
                for q in range(w):
                    heads_of_group = [float(rows[r, head, k, q, i]) for k in range(g)]
                    per_query.append(max(heads_of_group) if group == "max" else sum(heads_of_group) / g)
                p = int(positions[r, head, i])
                obs[r, head, p] = sum(per_query) / w
                fresh[r, head, p] = now - p < w
            if rescale:
                top = max(obs[r, head, p] for p in positions[r, head].tolist() if not fresh[r, head, p])
                for p in positions[r, head].tolist():
                    obs[r, head, p] /= top
    return obs, fresh


def reference_pool(values: dict, fresh: dict, r, head, kernel, how):
    """Pool the non-fresh tokens of one (row, head) in position order, padding the ends (max: -inf, avg: 0)."""
    order = sorted(p for (rr, hh, p) in values if (rr, hh) == (r, head) and not fresh[r, head, p])
    out = {}
    for k, p in enumerate(order):
        around = [order[j] for j in range(k - kernel // 2, k + kernel // 2 + 1) if 0 <= j < len(order)]
        vals = [values[r, head, q] for q in around]
        out[p] = max(vals) if how == "max" else sum(vals) / kernel
    return out


@pytest.mark.parametrize("group", ["mean", "max"])
@pytest.mark.parametrize("kernel,pool", [(1, "max"), (3, "avg"), (7, "max")])
def test_instantaneous_window_is_rkv_importance(group, kernel, pool):
    b, h, g, w, n, now = 2, 2, 3, 4, 13, 60
    rows = window_rows(b, h, g, w, n, seed=9)
    positions = shuffled_positions(b, h, n, start=now - n + 1, seed=10)
    scorer = Instantaneous(window=w, group=group, kernel=kernel, pool=pool)
    assert scorer.query_window() == w and not scorer.every_step()
    asked = []
    got = scorer.update(context(positions=positions, now=now, window=lambda k: asked.append(k) or rows))
    assert asked == [w]
    obs, fresh = reference_window_observation(rows, positions, now, group, rescale=False)
    for r in range(b):
        for head in range(h):
            pooled = reference_pool(obs, fresh, r, head, kernel, pool)
            for i in range(n):
                p = int(positions[r, head, i])
                want = obs[r, head, p] if fresh[r, head, p] else pooled[p]
                assert abs(float(got[r, head, i]) - want) < 1e-6, (r, head, p)


def test_peak_window_is_gkv_history():
    """Three compressions of G-KV's max-decay merge with rescaled observations; fresh tokens are not stored."""
    b, h, g, w, n, decay = 1, 2, 2, 3, 10, 0.8
    positions = shuffled_positions(b, h, n, start=0, seed=11)
    scorer = Peak(window=w, group="max", rescale="max", decay=decay)
    state = torch.zeros(b, h, n)
    history = {}
    for call, now in enumerate([9, 9, 9]):
        rows = window_rows(b, h, g, w, n, seed=20 + call)
        got = scorer.update(context(state=state, positions=positions, now=now, window=lambda k, r=rows: r))
        obs, fresh = reference_window_observation(rows, positions, now, "max", rescale=True)
        for head in range(h):
            for i in range(n):
                p = int(positions[0, head, i])
                if fresh[0, head, p]:
                    want = obs[0, head, p]  # scored by its observation, remembered as nothing
                    assert float(state[0, head, i]) == 0.0
                else:
                    history[head, p] = max(decay * history.get((head, p), 0.0), obs[0, head, p])
                    want = history[head, p]
                    assert abs(float(state[0, head, i]) - want) < 1e-6
                assert abs(float(got[0, head, i]) - want) < 1e-6


def test_peak_every_step_is_max_decay():
    attention = torch.tensor([[[0.5, 0.1, 0.2]]])
    state = torch.tensor([[[0.2, 0.9, 0.0]]])
    got = Peak(decay=0.5).update(context(attention=attention, state=state, positions=torch.tensor([[[3, 4, 5]]]),
                                         now=5))
    torch.testing.assert_close(got, torch.tensor([[[0.5, 0.9 * 0.5, 0.2]]]), rtol=0, atol=0)
    assert Peak().every_step() and Peak().query_window() == 0


def test_ema_and_accumulated_merge_windows_without_fresh_tokens():
    b, h, g, w, n, now = 1, 1, 2, 2, 6, 30
    positions = torch.tensor([[[25, 30, 26, 29, 27, 28]]])
    rows = window_rows(b, h, g, w, n, seed=12)
    mean = rows.mean(2).mean(2)  # (b, h, n): group mean, then the queries
    fresh = (now - positions) < w
    ema_state = torch.full((b, h, n), 0.5)
    got = EMA(window=w, alpha=0.5).update(context(state=ema_state, positions=positions, now=now,
                                                  window=lambda k: rows))
    torch.testing.assert_close(got, torch.where(fresh, mean, 0.25 + mean))
    torch.testing.assert_close(ema_state, torch.where(fresh, torch.full_like(mean, 0.5), 0.25 + mean))
    acc_state = torch.ones(b, h, n)
    got = Accumulated(window=w).update(context(state=acc_state, positions=positions, now=now,
                                              window=lambda k: rows))
    torch.testing.assert_close(got, torch.where(fresh, mean, 1 + mean))


def test_every_step_ema_is_unchanged_by_the_new_options():
    """Without a window the EMA is Moment-KV's Eq. 5 in place, bit for bit."""
    g = torch.Generator().manual_seed(13)
    state = torch.rand(2, 3, 7, generator=g)
    attention = torch.rand(2, 3, 7, generator=g)
    want = state * 0.9 + attention
    scorer = EMA(alpha=0.9)
    got = scorer.update(context(attention=attention, state=state, positions=torch.arange(7).expand(2, 3, 7), now=6))
    assert got is state and torch.equal(got, want)
    assert scorer.every_step() and scorer.query_window() == 0


def test_pooling_follows_positions_not_slots():
    """Max pooling over neighbours in sequence order: slot order must not matter."""
    attention = torch.tensor([[[0.0, 0.9, 0.0, 0.1, 0.0]]])
    positions = torch.tensor([[[10, 14, 11, 12, 13]]])  # sequence order: slots 0, 2, 3, 4, 1
    got = Instantaneous(kernel=3).update(context(attention=attention, positions=positions, now=14))
    # sequence values [0.0, 0.0, 0.1, 0.0, 0.9] pooled with kernel 3: [0.0, 0.1, 0.1, 0.9, 0.9]
    assert torch.equal(got, attention[..., [0, 1, 3, 3, 1]])


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize("scorer,path,fragment", [
    ({"type": "ema", "kernel": 4}, "kernel", "must be odd"),
    ({"type": "instantaneous", "group": "max"}, "group", "needs a query window"),
    ({"type": "ema", "window": 8, "bias_correction": True}, "bias_correction", "needs window: 0"),
    ({"type": "peak", "decay": 0}, "decay", "must be in (0, 1]"),
    ({"type": "redundancy", "retain": "newest"}, "retain", "must be"),
    ({"type": "redundancy", "threshold": 2.0}, "threshold", "must be in [-1, 1]"),
    ({"type": "last_hit", "threshold": 0}, "threshold", "must be > 0"),
    ({"type": "instantaneous", "window": -1}, "window", "must be in [0, 4096]"),
])
def test_bad_parameters_name_their_field(scorer, path, fragment):
    with pytest.raises(momentkv.PolicyError) as info:
        load_policy({"decode": {"budget": 16, "scorers": [scorer]}})
    assert any(d.path == f"decode.scorers[0].{path}" and fragment in d.message for d in info.value.details), (
        info.value.problems)


def test_an_empty_window_observes_nothing():
    positions = torch.tensor([[[3, 4, 5]]])
    empty = torch.zeros(1, 1, 2, 0, 3)
    state = torch.tensor([[[0.5, 0.25, 0.0]]])
    got = Peak(window=4, decay=0.5).update(context(state=state, positions=positions, now=5, window=lambda k: empty))
    torch.testing.assert_close(got, torch.tensor([[[0.25, 0.125, 0.0]]]))
    assert torch.isfinite(Instantaneous(window=4, kernel=3).update(
        context(positions=positions, now=5, window=lambda k: empty))).all()
