"""StreamingLLM, KNorm and PyramidKV selections, capacities per layer, and the no-compression identity."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import momentkv
from momentkv.errors import PolicyError
from models import FAMILIES, prompts, tiny_model


def run(model, inputs, policy, new_tokens=2):
    handle = momentkv.patch(model, policy)
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    cache = handle.last_cache
    handle.remove()
    return out, cache


def prompt_positions(layer) -> torch.Tensor:
    return layer.positions[..., : layer.context_slots]


def test_streamingllm_keeps_first_real_tokens_and_the_newest():
    inputs = prompts(batch=3, length=20, seed=5)  # rows padded by 0, 2, 4 tokens
    _, cache = run(tiny_model("qwen3"), inputs, {"prefill": {"type": "streamingllm", "capacity": 9, "sinks": 3}})
    for layer in cache.layers:
        assert layer.context_slots == 9
        for row, pad in enumerate([0, 2, 4]):
            expected = list(range(pad, pad + 3)) + list(range(14, 20))
            for head in range(2):
                assert sorted(prompt_positions(layer)[row, head].tolist()) == expected


def test_knorm_keeps_the_smallest_key_norms():
    model = tiny_model("llama")
    inputs = prompts(batch=2, length=24, seed=6)
    with torch.no_grad():
        full = model(**inputs, cache=DynamicCache(config=model.config), use_cache=True).past_key_values
    _, cache = run(model, inputs, {"prefill": {"type": "knorm", "capacity": 0.5}})
    real = inputs["attention_mask"].bool()
    for idx, layer in enumerate(cache.layers):
        assert layer.context_slots == 12  # half of 24
        norms = full.layers[idx].keys.float().norm(dim=-1).masked_fill(~real[:, None], float("inf"))
        expected = norms.topk(12, dim=-1, largest=False).indices.sort(dim=-1).values
        assert torch.equal(prompt_positions(layer), expected)


def test_pyramid_capacities_fall_from_bottom_to_top():
    model = tiny_model("llama", layers=4)
    inputs = prompts(batch=1, length=64, seed=7)
    _, cache = run(model, inputs, {"prefill": {"type": "pyramidkv", "capacity": 24, "window": 4, "beta": 4}})
    caps = [layer.context_slots for layer in cache.layers]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1]
    assert abs(sum(caps) / 4 - 24) <= 0.5  # the average capacity is the one asked for
    assert caps[-1] == 4 + 20 // 4  # the top layer keeps (capacity - window) / beta beyond the window
    # Each layer keeps exactly SnapKV's choice at that layer's capacity.
    for idx, cap in enumerate(caps):
        _, snap = run(model, inputs, {"prefill": {"type": "snapkv", "capacity": cap, "window": 4}})
        assert torch.equal(prompt_positions(cache.layers[idx]), prompt_positions(snap.layers[idx]))


def test_pyramid_explicit_schedule_per_layer():
    model = tiny_model("mistral", layers=4)
    inputs = prompts(batch=2, length=40, seed=8)
    policy = {"prefill": {"type": "pyramidkv", "schedule": [30, 20, 12, 9], "window": 4},
              "decode": {"budget": 4, "scorers": [{"type": "ema", "alpha": 0.9}]}}
    handle = momentkv.patch(model, policy)
    model.generate(**inputs, max_new_tokens=9, do_sample=False)
    stats = handle.stats()["layers"]
    handle.remove()
    assert [s["prompt_stored"] for s in stats] == [30, 20, 12, 9]
    assert [s["stored"] for s in stats] == [34, 24, 16, 13]
    # Two points are interpolated linearly across the layers.
    _, cache = run(model, inputs, {"prefill": {"type": "pyramidkv", "schedule": [30, 9], "window": 4}})
    assert [layer.context_slots for layer in cache.layers] == [30, 23, 16, 9]


def test_pyramid_rejects_capacity_and_schedule_together():
    with pytest.raises(PolicyError):
        momentkv.load_policy({"prefill": {"type": "pyramidkv", "capacity": 64, "schedule": [64, 32]}})


@pytest.mark.parametrize("bad", [{"type": "snapkv", "kernel": 4}, {"type": "snapkv", "capacity": 0},
                                 {"type": "knorm", "capacity": 1.5}, {"type": "streamingllm", "window": 8}])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(PolicyError):
        momentkv.load_policy({"prefill": bad})


COMPRESSORS = [
    {"type": "snapkv", "capacity": 64},
    {"type": "pyramidkv", "capacity": 64, "window": 8},
    {"type": "streamingllm", "capacity": 20},
    {"type": "knorm", "capacity": 1.0},
]


@pytest.mark.parametrize("family", FAMILIES)
def test_capacity_at_least_prompt_is_bit_identical(family):
    model = tiny_model(family)
    inputs = prompts(batch=3, length=20, seed=9)  # left-padded rows of 20, 18 and 16 real tokens
    reference = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    for compressor in COMPRESSORS:
        with momentkv.patched(model, {"prefill": compressor}) as handle:
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            assert all(layer["prompt_stored"] == 20 for layer in handle.stats()["layers"])
        assert torch.equal(out.sequences, reference.sequences), compressor
        assert torch.equal(torch.stack(out.logits), torch.stack(reference.logits)), compressor


def test_ratio_capacity_follows_the_prompt_length():
    model = tiny_model("qwen2")
    for length, expected in [(40, 10), (21, 5)]:
        _, cache = run(model, prompts(batch=1, length=length), {"prefill": {"type": "snapkv", "capacity": 0.25,
                                                                            "window": 4}})
        assert [layer.context_slots for layer in cache.layers] == [expected, expected]
