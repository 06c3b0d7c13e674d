"""Decode traces: random keys, values and attention, fed through the real cache layer step by step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from momentkv.engine.layer import EvictingLayer
from momentkv.core.plan import LayerPlan, build_plans
from momentkv.policy.loader import PolicySource, load_policy
from momentkv.policy.schema import Policy

# ----------------------------------------------------------------- decode traces
@dataclass(eq=False)
class DecodeTrace:
    """A prompt and ``steps`` generated tokens for one cache layer, with the attention each step gives.

    ``keys``/``values``: ``(batch, kv_heads, prompt_len + steps, head_dim)``, token ``t``'s key at index ``t``.
    ``queries``: ``(batch, kv_heads, prompt_len, head_dim)``, the prompt's queries (for prefill compressors).
    ``logits``: ``(batch, kv_heads, steps, prompt_len + steps)``, how much step ``t``'s query likes each token;
    ``sharpness[t]`` scales them before the softmax (0: uniform attention, 30: nearly one-hot).
    """

    seed: int
    batch: int
    kv_heads: int
    head_dim: int
    prompt_len: int
    steps: int
    sharpness: tuple[float, ...]
    keys: torch.Tensor = field(init=False, repr=False)
    values: torch.Tensor = field(init=False, repr=False)
    queries: torch.Tensor = field(init=False, repr=False)
    step_queries: torch.Tensor = field(init=False, repr=False)
    logits: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        b, h, d, total = self.batch, self.kv_heads, self.head_dim, self.prompt_len + self.steps
        self.keys = torch.randn((b, h, total, d), generator=g)
        self.values = torch.randn((b, h, total, d), generator=g)
        self.queries = torch.randn((b, h, self.prompt_len, d), generator=g)
        # A few heavy hitters, liked by every step, over per-step noise: the pattern attention scorers exploit.
        heavy = (torch.rand((b, h, 1, total), generator=g) < 0.15).float() * 3.0
        self.logits = torch.randn((b, h, self.steps, total), generator=g) + heavy
        # The decode queries, for scorers that read the attention of a window of queries (drawn last, so the
        # tensors above stay what they were for a given seed).
        self.step_queries = torch.randn((b, h, self.steps, d), generator=g)

    def attention(self, step: int, positions: torch.Tensor) -> torch.Tensor:
        """Step ``step``'s attention ``(batch, kv_heads, S)`` float32 over the stored tokens ``positions``."""
        liked = self.logits[:, :, step].gather(-1, positions) * self.sharpness[step]  # (b, h, S)
        # softmax by hand: torch.softmax parallelises even tiny rows, which is slow on a busy machine
        weights = (liked - liked.amax(-1, keepdim=True)).exp()
        return weights / weights.sum(-1, keepdim=True)


@st.composite
def decode_traces(draw, max_prompt: int = 24, max_steps: int = 48, max_batch: int = 2, max_kv_heads: int = 3):
    """Random :class:`DecodeTrace` objects: shapes, lengths, seeds and per-step sharpness all drawn."""
    steps = draw(st.integers(1, max_steps))
    return DecodeTrace(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, max_batch)),
        kv_heads=draw(st.integers(1, max_kv_heads)),
        head_dim=draw(st.sampled_from([4, 8])),
        prompt_len=draw(st.integers(1, max_prompt)),
        steps=steps,
        sharpness=tuple(draw(st.lists(
            st.one_of(st.just(0.0), st.floats(0.1, 30.0)), min_size=steps, max_size=steps))),
    )


# ----------------------------------------------------------------- running a trace through the cache layer
@dataclass
class StepRecord:
    """The layer after one decode step: ``generated`` tokens so far, and its per-slot tensors (copies)."""

    generated: int
    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor | None


@dataclass
class TraceRun:
    """A policy's plan for one layer, the trace, and the layer after the prompt and after every step."""

    policy: Policy
    plan: LayerPlan
    trace: DecodeTrace
    records: list[StepRecord]
    prompt: StepRecord


def _snapshot(layer: EvictingLayer, generated: int) -> StepRecord:
    scores = layer.scoring.step_total.clone() if layer.scoring.step_total is not None else None
    return StepRecord(generated, layer.positions.clone(), layer.keys.clone(), layer.values.clone(), scores)


def run_trace(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> TraceRun:
    """Feed ``trace`` through the cache layer ``policy`` plans for layer ``layer_idx`` of ``num_layers``."""
    policy = load_policy(policy)
    plan = build_plans(policy, num_layers, [None] * num_layers)[layer_idx]
    layer = EvictingLayer(plan)
    p = trace.prompt_len
    layer.update(trace.keys[:, :, :p], trace.values[:, :, :p])
    layer.observe(trace.queries, layer.keys, None, trace.head_dim**-0.5)
    prompt = _snapshot(layer, 0)
    records = []
    for step in range(trace.steps):
        t = p + step
        layer.update(trace.keys[:, :, t : t + 1], trace.values[:, :, t : t + 1])
        if plan.budget is not None:
            attention = trace.attention(step, layer.positions) if plan.needs_step_attention else None
            # observe() keeps the step's query for windowed scorers and folds the trace's attention in.
            layer.observe(trace.step_queries[:, :, step : step + 1], layer.keys, None, trace.head_dim**-0.5,
                          attention)
        records.append(_snapshot(layer, step + 1))
    return TraceRun(policy, plan, trace, records, prompt)
