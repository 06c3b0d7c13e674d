"""An independent reference for physical eviction: the full cache, with evicted tokens masked out.

The oracle never removes anything. It runs the unpatched model with eager attention and a full
``DynamicCache``; at every decode step it passes a per-head additive 4D mask that hides the tokens its own
bookkeeping has evicted, reads the attention weights the model returns, and scores and checks evictions with
plain per-token loops over sequence indices (no slots, no scatter, no gather):

- when the generated tokens alive in a (row, KV head) reach the budget, before the new token is written,
  the alive, unprotected generated tokens with the lowest scores are evicted (as many as the budget needs);
- protected: the first ``sinks`` generated tokens, and the ``recent - 1`` newest alive ones (the incoming
  token makes ``recent``); tokens a sliding window can no longer see score lowest and may always go;
- scores: the policy's scorers over the attention the current query gives each alive generated token,
  averaged over the query heads of the KV head.

Near-ties. The engine and the oracle compute the same scores through different float32 arithmetic (SDPA or
the single pass, eager attention), so two tokens whose scores are within rounding of each other may be
ranked either way, differently on each CPU vector path; both choices are right, and the logits that follow
differ by far more than rounding. So the oracle scores every token as an interval, its float32 score
widened by ``SCORE_RTOL`` of the scale of each scorer's output and carried through the scorer's
normalisation (a rank may move past every score within the tolerance), and, given the engine's choices
(:class:`EngineChoices`), it *follows* them: at each eviction it asserts that the engine's victims are the
right number of unprotected tokens that no kept candidate scores clearly below (``lo(victim) <= hi(kept)``),
then evicts them too. An engine that evicts a token clearly above the lowest fails. Without the engine's
choices the oracle picks the lowest scores itself.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from momentkv.core.plan import build_plans
from momentkv.patches import adapter_for
from momentkv.policy import load_policy
from momentkv.scoring.base import ScoreContext
from momentkv.scoring.normalize import normalize_scores

# The relative distance, in units of the largest |score| of a scorer's output, within which the engine's
# float32 scores and the oracle's may differ. Both runs compute the same attention and keys, each rounding
# its own way: a single float32 attention probability at these sizes (about 20 keys of head_dim 16, small
# logits) is already uncertain by up to about 6e-6 of itself (``accuracy.py``'s worst-case bound), and the
# scores carry that through the layers and the scorers' running sums. Measured: at most 8e-7 over every
# policy and family of test_engine_oracle.py on ATen's default, AVX2 and AVX-512 paths.
# 1e-5 stays far below the gaps that decide an eviction: ``EngineChoices.forced`` counts the evictions it
# leaves no choice in, and the tests require most of them to be.
SCORE_RTOL = 1e-5


class EngineChoices:
    """The tokens each layer of the engine holds after every step, recorded by ``physical_run(on_step=...)``,
    for the oracle to follow; the oracle counts what it checked."""

    def __init__(self):
        self.positions: list[list[torch.Tensor]] = []  # per step, per layer: (b, kv, S) sequence indices
        self.checked = 0  # evictions compared (per row and KV head, or row for granularity layer)
        self.forced = 0  # of which no other candidate was within rounding of the victims' scores

    def __call__(self, step: int, cache) -> None:
        assert step == len(self.positions)
        self.positions.append([layer.positions.clone() for layer in cache.layers])


def untie_key_norms(model, seed: int = 0):
    """Give a Qwen3 model's per-head q/k RMSNorms random gains, as training does; return the model.

    A freshly initialised Qwen3 normalises every key to the RMS of its gains (all 1), so every key has norm
    ``sqrt(head_dim)`` up to ``rms_norm_eps`` and rounding (RoPE keeps the norm): a ``key_norm`` scorer then sees
    nothing but near-ties, which any choice satisfies. With gains drawn from ``[0.5, 1.5]`` the norms differ by
    tens of percent. Other families are returned unchanged.
    """
    if model.config.model_type != "qwen3":
        return model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
    return model


def rank_bounds(scores: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest ``rank_of`` ``(T,)`` each score can take when every score may be off by ``tol``
    (two scores within ``2 tol`` may be ordered either way; exact ties either way too)."""
    t = scores.shape[-1]
    diff = scores[:, None] - scores[None, :]  # [i, j] = s_i - s_j
    other = ~torch.eye(t, dtype=torch.bool)
    below = ((diff > 2 * tol) & other).sum(-1)  # surely below i
    not_above = ((diff >= -2 * tol) & other).sum(-1)  # may be below i
    steps = max(t - 1, 1)
    return below.double() / steps, not_above.double() / steps


def score_bounds(scorer, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` ``(T,)`` float64 of one scorer's normalised output ``out`` ``(T,)`` (before its weight)."""
    raw = out.double()
    tol = SCORE_RTOL * float(raw.abs().max()) if raw.numel() else 0.0
    how = scorer.normalize
    if how == "rank":
        return rank_bounds(raw, tol)
    value = normalize_scores(out.view(1, 1, -1), how).view(-1).double()
    if how == "none":
        spread = tol
    elif how in ("sum", "max"):  # divided by a sum or maximum that carries the same relative error
        spread = 2 * SCORE_RTOL * float(value.abs().max()) if value.numel() else 0.0
    elif how == "zscore":  # the centred values' error over the standard deviation, and the deviation's own
        std = float((raw - raw.mean()).square().mean().sqrt())
        spread = float("inf") if std == 0 else 2 * tol / std
    else:
        raise ValueError(f"no bound for normalisation {how!r}")
    return value - spread, value + spread


class MaskingOracle:
    def __init__(self, model, policy, prompt_mask: torch.Tensor, follow: EngineChoices | None = None):
        self.model = model
        self.policy = load_policy(policy)
        cfg = model.config
        windows = adapter_for(cfg.model_type).sliding_windows(cfg)
        self.plans = build_plans(self.policy, cfg.num_hidden_layers, windows)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.batch, self.prompt_len = prompt_mask.shape
        self.prompt_valid = prompt_mask.bool()
        self.cache = DynamicCache()
        self.follow = follow
        # Per layer: alive (b, kv, n) over every token seen, and per-scorer state over the generated tokens.
        self.alive = [torch.ones(self.batch, self.kv_heads, self.prompt_len, dtype=torch.bool) for _ in self.plans]
        self.states = [[{} for _ in plan.scorers] for plan in self.plans]
        # Per layer: (b, kv, i) -> (score, lo, hi) of each alive generated token, from the last step.
        self.scores = [dict() for _ in self.plans]
        self.seen = 0
        self.steps = 0

    def _mask(self) -> torch.Tensor:
        """Additive mask ``(batch, heads, 1, seen)`` for the current decode query (position ``seen - 1``)."""
        masks = []
        for layer, plan in enumerate(self.plans):
            allowed = self.alive[layer].clone()
            allowed[..., : self.prompt_len] &= self.prompt_valid[:, None, :]
            if plan.sliding_window is not None:
                idx = torch.arange(self.seen)
                allowed &= (idx > self.seen - 1 - plan.sliding_window)
            allowed = allowed.repeat_interleave(self.heads // self.kv_heads, dim=1).unsqueeze(2)
            masks.append(torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min))
        return masks

    def prefill(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=self.cache, use_cache=True)
        self.seen = input_ids.shape[1]
        return out.logits[:, -1]

    def _engine_kept(self, layer: int, b: int, h: int) -> set[int]:
        """The generated tokens (not the incoming one) the engine holds in (row, KV head) after this step."""
        held = self.follow.positions[self.steps + 1][layer][b, h].tolist()
        return {i for i in held if self.prompt_len <= i < self.seen}

    def _evict_before_insert(self, layer: int, plan) -> None:
        t = self.seen  # index of the incoming token
        budget = None if plan.budget is None else plan.budget_at(t - self.prompt_len + 1)
        for b in range(self.batch):
            # granularity "layer": one choice per row from the scores averaged over the KV heads.
            head_sets = [range(self.kv_heads)] if plan.granularity == "layer" else [[h] for h in range(self.kv_heads)]
            for heads in head_sets:
                alive_gen = [i for i in range(self.prompt_len, t) if self.alive[layer][b, heads[0], i]]
                held = len(alive_gen)
                due = budget is not None and held + 1 > budget and (
                    plan.cadence == 1 or held + 1 > budget + plan.cadence - 1)
                needed = held + 1 - budget if due else 0
                newest = set(sorted(alive_gen)[-(plan.recent - 1):]) if plan.recent > 1 else set()
                dead, candidates = set(), {}
                for i in alive_gen:
                    if plan.sliding_window is not None and i <= t - plan.sliding_window:
                        dead.add(i)
                        candidates[i] = (float("-inf"),) * 3
                    elif not (i < self.prompt_len + plan.sinks or i in newest) and needed:
                        entries = [self.scores[layer][(b, h, i)] for h in heads]
                        candidates[i] = tuple(sum(e[k] for e in entries) / len(entries) for k in range(3))
                if self.follow is None:
                    ranked = sorted(candidates, key=lambda i: (candidates[i][0], i))
                    victims = set(ranked[:needed])
                else:
                    victims = self._check(layer, b, heads, alive_gen, candidates, dead, needed)
                for h in heads:
                    for i in victims:
                        self.alive[layer][b, h, i] = False

    def _check(self, layer, b, heads, alive_gen, candidates, dead, needed) -> set[int]:
        """The engine's victims in (row, heads), checked against the oracle's rule and scores."""
        where = f"layer {layer}, row {b}, KV heads {list(heads)}, incoming token {self.seen}"
        kept = [self._engine_kept(layer, b, h) for h in heads]
        assert all(k == kept[0] for k in kept), f"{where}: the heads of one ranking keep different tokens {kept}"
        kept = kept[0]
        assert kept <= set(alive_gen), f"{where}: the engine holds tokens {sorted(kept - set(alive_gen))} " \
                                       "the oracle has evicted"
        victims = set(alive_gen) - kept
        if not victims:
            assert not needed, f"{where}: over budget, {needed} token(s) to evict, the engine evicted none"
            return victims
        assert victims <= set(candidates), f"{where}: protected tokens {sorted(victims - set(candidates))} evicted"
        # As many as the budget needs; more only where every victim is dead (hidden by the sliding window).
        assert len(victims) == needed or (len(victims) > needed and victims <= dead), \
            f"{where}: {len(victims)} token(s) evicted, the budget needs {needed} (dead: {sorted(dead)})"
        others = [candidates[i] for i in candidates if i not in victims]
        if others:
            lowest_kept = min(c[2] for c in others)  # the lowest score a kept candidate may have
            for i in victims:
                assert candidates[i][1] <= lowest_kept, (
                    f"{where}: token {i} evicted with score {candidates[i][0]:.9g} (at least {candidates[i][1]:.9g})"
                    f", a kept token scores at most {lowest_kept:.9g}: "
                    + ", ".join(f"{j}: {candidates[j][0]:.9g}" for j in sorted(candidates)))
            if needed and max(candidates[i][2] for i in victims) < min(c[1] for c in others):
                self.follow.forced += 1
        self.follow.checked += 1
        return victims

    def step(self, token_ids, position_ids):
        """Feed one token per row; return logits ``(batch, vocab)``."""
        for layer, plan in enumerate(self.plans):
            self._evict_before_insert(layer, plan)
            self.alive[layer] = torch.cat([self.alive[layer], torch.ones(self.batch, self.kv_heads, 1, dtype=torch.bool)], -1)
        self.seen += 1
        self.steps += 1
        masks = self._mask()
        # One mask per layer: run the layers' masks through a forward hook on each attention module.
        handles = []
        for layer, module in enumerate(self.model.model.layers):
            def pre_hook(mod, args, kwargs, m=masks[layer]):
                kwargs["attention_mask"] = m
                return args, kwargs
            handles.append(module.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            out = self.model(input_ids=token_ids, position_ids=position_ids, cache=self.cache, use_cache=True,
                             output_attentions=True, attention_mask=masks[0])
        finally:
            for handle in handles:
                handle.remove()
        self._update_scores(out.attentions)
        return out.logits[:, -1]

    def _update_scores(self, attentions) -> None:
        t = self.seen - 1
        groups = self.heads // self.kv_heads
        for layer, plan in enumerate(self.plans):
            if plan.budget is None:
                continue
            weights = attentions[layer][:, :, -1, :].float()  # (b, heads, seen)
            per_kv = weights.view(self.batch, self.kv_heads, groups, -1).mean(2)  # (b, kv, seen)
            self.scores[layer] = {}
            for b in range(self.batch):
                for h in range(self.kv_heads):
                    gen = [i for i in range(self.prompt_len, self.seen) if self.alive[layer][b, h, i]]
                    attn = per_kv[b, h, gen].view(1, 1, -1)
                    positions = torch.tensor(gen).view(1, 1, -1)
                    age = torch.tensor([float(t - i) for i in gen]).view(1, 1, -1)
                    keys = self.cache.layers[layer].keys[b, h, gen].view(1, 1, len(gen), -1)
                    values = self.cache.layers[layer].values[b, h, gen].view(1, 1, len(gen), -1)
                    total = None
                    lo = hi = torch.zeros(len(gen), dtype=torch.float64)
                    for s_idx, scorer in enumerate(plan.scorers):
                        memory = self.states[layer][s_idx]
                        state = torch.tensor([memory.get((b, h, i), 0.0) for i in gen]).view(1, 1, -1)
                        out = scorer.update(ScoreContext(attention=attn, age=age, keys=keys, state=state,
                                                         positions=positions, now=t, values=values))
                        for j, i in enumerate(gen):
                            memory[(b, h, i)] = float(state[0, 0, j])
                        low, high = score_bounds(scorer, out.view(-1))
                        weight = float(scorer.weight)
                        lo, hi = (lo + weight * low, hi + weight * high) if weight >= 0 else \
                            (lo + weight * high, hi + weight * low)
                        out = normalize_scores(out, scorer.normalize) * scorer.weight
                        total = out if total is None else total + out
                    for j, i in enumerate(gen):
                        self.scores[layer][(b, h, i)] = (float(total[0, 0, j]), float(lo[j]), float(hi[j]))
