"""An independent reference for physical eviction: the full cache, with evicted tokens masked out.

The oracle never removes anything. It runs the unpatched model with eager attention and a full
``DynamicCache``; at every decode step it passes a per-head additive 4D mask that hides the tokens its own
bookkeeping has evicted, reads the attention weights the model returns, and applies the eviction rule with
plain per-token loops over sequence indices (no slots, no scatter, no gather):

- when the generated tokens alive in a (row, KV head) equal the budget, before the new token is written,
  the alive, unprotected generated token with the lowest score is evicted;
- protected: the first ``sinks`` generated tokens, and the ``recent - 1`` newest alive ones (the incoming
  token makes ``recent``); tokens a sliding window can no longer see are evicted first;
- scores: the policy's scorers over the attention the current query gives each alive generated token,
  averaged over the query heads of the KV head.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from momentkv.core.plan import build_plans
from momentkv.patches import adapter_for
from momentkv.policy import load_policy
from momentkv.scoring.base import ScoreContext
from momentkv.scoring.normalize import normalize_scores


class MaskingOracle:
    def __init__(self, model, policy, prompt_mask: torch.Tensor):
        self.model = model
        self.policy = load_policy(policy)
        cfg = model.config
        windows = adapter_for(cfg.model_type).sliding_windows(cfg)
        self.plans = build_plans(self.policy, cfg.num_hidden_layers, windows)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.batch, self.prompt_len = prompt_mask.shape
        self.prompt_valid = prompt_mask.bool()
        self.cache = DynamicCache()
        # Per layer: alive (b, kv, n) over every token seen, and per-scorer state over the generated tokens.
        self.alive = [torch.ones(self.batch, self.kv_heads, self.prompt_len, dtype=torch.bool) for _ in self.plans]
        self.states = [[{} for _ in plan.scorers] for plan in self.plans]
        self.seen = 0

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

    def _evict_before_insert(self, layer: int, plan) -> None:
        if plan.budget is None:
            return
        t = self.seen  # index of the incoming token
        budget = plan.budget_at(t - self.prompt_len + 1)
        for b in range(self.batch):
            # granularity "layer": one choice per row from the scores averaged over the KV heads.
            head_sets = [range(self.kv_heads)] if plan.granularity == "layer" else [[h] for h in range(self.kv_heads)]
            for heads in head_sets:
                alive_gen = [i for i in range(self.prompt_len, t) if self.alive[layer][b, heads[0], i]]
                if len(alive_gen) < budget:
                    continue
                newest = sorted(alive_gen)[-(plan.recent - 1):] if plan.recent > 1 else []
                best, best_score = None, None
                for i in alive_gen:
                    dead = plan.sliding_window is not None and i <= t - plan.sliding_window
                    if not dead and (i < self.prompt_len + plan.sinks or i in newest):
                        continue
                    score = float("-inf") if dead else sum(self.scores[layer][(b, h, i)] for h in heads) / len(heads)
                    if best is None or score < best_score:
                        best, best_score = i, score
                for h in heads:
                    self.alive[layer][b, h, best] = False

    def step(self, token_ids, position_ids):
        """Feed one token per row; return logits ``(batch, vocab)``."""
        for layer, plan in enumerate(self.plans):
            self._evict_before_insert(layer, plan)
            self.alive[layer] = torch.cat([self.alive[layer], torch.ones(self.batch, self.kv_heads, 1, dtype=torch.bool)], -1)
        self.seen += 1
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
        if not hasattr(self, "scores"):
            self.scores = [dict() for _ in self.plans]
        t = self.seen - 1
        groups = self.heads // self.kv_heads
        for layer, plan in enumerate(self.plans):
            if plan.budget is None:
                continue
            weights = attentions[layer][:, :, -1, :].float()  # (b, heads, seen)
            per_kv = weights.view(self.batch, self.kv_heads, groups, -1).mean(2)  # (b, kv, seen)
            for b in range(self.batch):
                for h in range(self.kv_heads):
                    gen = [i for i in range(self.prompt_len, self.seen) if self.alive[layer][b, h, i]]
                    attn = per_kv[b, h, gen].view(1, 1, -1)
                    age = torch.tensor([float(t - i) for i in gen]).view(1, 1, -1)
                    keys = self.cache.layers[layer].keys[b, h, gen].view(1, 1, len(gen), -1)
                    total = None
                    for s_idx, scorer in enumerate(plan.scorers):
                        memory = self.states[layer][s_idx]
                        state = torch.tensor([memory.get((b, h, i), 0.0) for i in gen]).view(1, 1, -1)
                        out = scorer.update(ScoreContext(attention=attn, age=age, keys=keys, state=state))
                        for j, i in enumerate(gen):
                            memory[(b, h, i)] = float(state[0, 0, j])
                        out = normalize_scores(out, scorer.normalize) * scorer.weight
                        total = out if total is None else total + out
                    for j, i in enumerate(gen):
                        self.scores[layer][(b, h, i)] = float(total[0, 0, j])
