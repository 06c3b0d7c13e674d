"""Prefill compressors with decode eviction, one budget for the whole cache (scope: all), chunked prefill."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import momentkv
from models import prompts, tiny_model


class CacheProbe(LogitsProcessor):
    """Records every layer's stats after each forward of ``generate``."""

    def __init__(self, handle):
        self.handle, self.steps = handle, []

    def __call__(self, input_ids, scores):
        self.steps.append(self.handle.stats()["layers"])
        return scores


def generate_probed(model, inputs, policy, new_tokens, **kwargs):
    handle = momentkv.patch(model, policy)
    probe = CacheProbe(handle)
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([probe]), **kwargs)
    cache = handle.last_cache
    handle.remove()
    return out, probe.steps, cache


# pyramid over 2 layers, 24 on average, window 4, beta 4: 20 / 4 = 5 beyond the window on top, 40 - 5 below
@pytest.mark.parametrize("name,caps", [("snapkv-moment.yaml", [24, 24]), ("pyramidkv-moment.yaml", [39, 9])])
def test_builtin_composition_holds_prompt_capacity_plus_decode_budget(name, caps):
    base = momentkv.load_policy(name).model_dump()
    base["prefill"].update(capacity=24, window=4)
    if "beta" in base["prefill"]:
        base["prefill"]["beta"] = 4
    base["decode"].update(budget=10, recent=2)
    out, steps, _ = generate_probed(tiny_model("qwen3"), prompts(batch=2, length=48, seed=10), base, 16)
    assert torch.isfinite(torch.stack(out.logits)).all()
    for step, layers in enumerate(steps[1:], start=1):  # steps[0]: the prompt, not compressed yet
        for layer, cap in zip(layers, caps):
            assert layer["prompt_stored"] == cap
            assert layer["stored"] <= cap + 10
            assert layer["stored"] == cap + min(step, 10)
    assert steps[-1][0]["evicted"] == len(steps) - 1 - 10  # tokens fed after the prompt, beyond the budget


def test_decode_eviction_never_touches_compressed_prompt():
    policy = {"prefill": {"type": "snapkv", "capacity": 16, "window": 4},
              "decode": {"budget": 6, "scorers": [{"type": "instantaneous"}]}}
    _, _, cache = generate_probed(tiny_model("llama"), prompts(batch=2, length=40, seed=11), policy, 14)
    _, _, only_prefill = generate_probed(tiny_model("llama"), prompts(batch=2, length=40, seed=11),
                                         {"prefill": policy["prefill"]}, 2)
    for layer, ref in zip(cache.layers, only_prefill.layers):
        assert torch.equal(layer.positions[..., :16], ref.positions[..., :16])
        assert bool((layer.positions[..., 16:] >= 40).all())


def test_scope_all_holds_one_budget_and_evicts_prompt_tokens():
    policy = {"decode": {"budget": 12, "scope": "all", "scorers": [{"type": "instantaneous"}]}}
    out, steps, cache = generate_probed(tiny_model("mistral"), prompts(batch=3, length=30, seed=12), policy, 20)
    assert torch.isfinite(torch.stack(out.logits)).all()
    for layers in steps[1:]:
        for layer in layers:
            assert layer["stored"] == 12
    for layer in cache.layers:
        assert bool(layer.valid.all()), "padding is evicted before any real token"
        assert bool((layer.positions < 30).any()), "some prompt tokens survive on their attention"
        assert layer.stats()["prompt_stored"] < 30


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_scope_all_first_eviction_keeps_what_the_last_prompt_query_attends_to(granularity):
    """TOVA over the whole cache: after the first decode step the surviving prompt tokens are the
    budget - 1 that the last prompt query attends to most (eager weights): averaged over all the layer's
    heads, the same tokens in every head (the built-in, as TOVA's paper), or per KV head over its group."""
    inputs = prompts(batch=1, length=32, seed=13)
    eager = tiny_model("qwen2", attn="eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    policy = momentkv.load_policy("tova-all.yaml").model_dump()
    assert policy["decode"]["granularity"] == "layer"
    policy["decode"]["budget"] = 10
    policy["decode"]["granularity"] = granularity
    _, _, cache = generate_probed(tiny_model("qwen2"), inputs, policy, 2)
    for layer, attn in zip(cache.layers, attentions):
        last = attn[:, :, -1].float().view(1, 2, 2, 32).mean(dim=2)  # (1, kv, prompt)
        if granularity == "layer":
            last = last.mean(dim=1, keepdim=True).expand(1, 2, 32)
        expected = last.topk(9, dim=-1).indices.sort(dim=-1).values
        survivors = layer.positions[layer.positions < 32].view(1, 2, 9).sort(dim=-1).values
        assert torch.equal(survivors, expected)


def test_recency_all_equals_a_sliding_window_model():
    """Whole-cache recency with budget B is the sliding-window attention of width B: a model configured
    with that window (no momentkv) gives the same logits while the prompt fits the window."""
    budget, length = 16, 12
    inputs = prompts(batch=2, length=length, seed=14)
    windowed = tiny_model("mistral", sliding_window=budget)
    reference = windowed.generate(**inputs, max_new_tokens=24, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    policy = momentkv.load_policy("recency-all.yaml").model_dump()
    policy["decode"]["budget"] = budget
    out, steps, _ = generate_probed(tiny_model("mistral"), inputs, policy, 24)
    assert all(layer["stored"] <= budget for layers in steps for layer in layers)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, reference.sequences)


def test_scope_all_with_prefill_compressor():
    policy = {"prefill": {"type": "snapkv", "capacity": 20, "window": 4},
              "decode": {"budget": 14, "scope": "all", "scorers": [{"type": "ema", "alpha": 0.8}]}}
    out, steps, _ = generate_probed(tiny_model("llama"), prompts(batch=2, length=36, seed=15), policy, 12)
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert all(layer["stored"] <= 14 for layers in steps[1:] for layer in layers)


@pytest.mark.parametrize("chunk", [16, 10, 13])  # 40 = 3 * 13 + 1: the last prompt token comes alone
def test_chunked_prefill_keeps_the_same_tokens(chunk):
    """A window spanning chunks (40 tokens in chunks of 16 or 10, window 12) is recomputed exactly."""
    inputs = prompts(batch=2, length=40, seed=16)
    policy = {"prefill": {"type": "snapkv", "capacity": 20, "window": 12, "pooling": "avg"}}
    whole, _, cache = generate_probed(tiny_model("llama"), inputs, policy, 6)
    chunked, _, chunked_cache = generate_probed(tiny_model("llama"), inputs, policy, 6, prefill_chunk_size=chunk)
    for a, b in zip(cache.layers, chunked_cache.layers):
        assert a.prompt_tokens == b.prompt_tokens == 40
        assert torch.equal(a.positions[..., :20], b.positions[..., :20])
    assert torch.equal(whole.sequences, chunked.sequences)


def test_chunked_prefill_with_capacity_above_prompt_is_bit_identical():
    model = tiny_model("qwen3")
    inputs = prompts(batch=2, length=40, seed=17)
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False, prefill_chunk_size=16)
    with momentkv.patched(model, "snapkv-moment.yaml"):
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, prefill_chunk_size=16)
    assert torch.equal(out, reference)
