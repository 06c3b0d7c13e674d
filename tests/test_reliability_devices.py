"""Devices: every cache layer keeps its tensors and scorer state on the device its keys arrive on.

Only the CPU is here, so the mechanism is tested on the ``meta`` device (a tensor created without following
the keys' device would land on the CPU, and mixing the two raises), and an accelerate ``device_map`` that
names each layer is tested end to end on the CPU. docs/devices.md states the GPU behaviour.
"""

import pytest
import torch

import momentkv
from momentkv.engine.layer import EvictingLayer
from momentkv.core.plan import build_plans
from momentkv.policy.loader import load_policy
from models import prompts, tiny_model

SCORERS = [{"type": "ema", "bias_correction": True}, {"type": "accumulated"}, {"type": "instantaneous"},
           {"type": "recency"}, {"type": "key_norm"}]


def _tensors(layer: EvictingLayer) -> dict:
    """Every tensor the layer and its parts (slots, scorer states, query window) hold, by attribute name
    (lists of tensors flattened)."""
    found = {}
    for owner in (layer, layer.slots, layer.scoring, layer.window):
        for name, value in vars(owner).items():
            if isinstance(value, torch.Tensor):
                found[name] = value
            elif isinstance(value, (list, tuple)):
                found.update({f"{name}[{i}]": t for i, t in enumerate(value) if isinstance(t, torch.Tensor)})
    return found


@pytest.mark.parametrize("prefill", [None, {"type": "snapkv", "capacity": 4, "window": 2, "kernel": 1}])
def test_layer_allocates_everything_on_the_keys_device(prefill):
    """The steady state (in-place eviction) and prefill on ``meta``: paths that read a value back to the
    host (``scope: all`` compaction counts protected slots) cannot run there and are covered on the CPU below."""
    policy = {"decode": {"budget": 3, "sinks": 1, "recent": 1, "scorers": SCORERS}}
    if prefill:
        policy["prefill"] = prefill
    plan = build_plans(load_policy(policy), 1, [None])[0]
    device = torch.device("meta")
    layer = EvictingLayer(plan)
    b, kv, heads, d = 2, 2, 4, 8
    layer.update(torch.empty(b, kv, 6, d, device=device), torch.empty(b, kv, 6, d, device=device), kwargs={})
    layer.observe(torch.empty(b, heads, 6, d, device=device), layer.keys, None, d ** -0.5)
    for _ in range(8):
        layer.update(torch.empty(b, kv, 1, d, device=device), torch.empty(b, kv, 1, d, device=device), kwargs={})
        layer.observe(torch.empty(b, heads, 1, d, device=device), layer.keys, None, d ** -0.5)
    assert layer.scoring.step_total is not None  # the last step's scores, normalised when first read
    tensors = _tensors(layer)
    assert {"keys", "values", "_positions", "_step_total"} <= set(tensors)  # positions stored once eviction began
    assert sum(name.startswith("states[") for name in tensors) == len(SCORERS)
    assert {name: t.device.type for name, t in tensors.items()} == {name: "meta" for name in tensors}
    assert layer.evicted > 0
    layer.reorder_cache(torch.tensor([1, 0]))  # beam reordering with an index on another device
    assert all(t.device.type == "meta" for t in _tensors(layer).values())


def test_accelerate_device_map_per_layer():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("qwen3", layers=3)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(3)}}
    model = accelerate.dispatch_model(model, device_map=device_map)
    inputs = prompts(2, 5)
    policies = [{"decode": {"budget": 3, "scorers": SCORERS[:2]}},
                {"decode": {"budget": 4, "scope": "all", "cadence": 2, "scorers": SCORERS[2:]}}]
    for policy, most in zip(policies, (5 + 3, 4 + 2 - 1)):
        with momentkv.patched(model, policy) as handle:
            model.generate(**inputs, max_new_tokens=8, do_sample=False)
            cache = handle.last_cache
        for idx, layer in enumerate(cache.layers):
            device = next(model.model.layers[idx].parameters()).device
            assert all(t.device == device for t in _tensors(layer).values())
            assert layer.stored <= most and layer.evicted > 0
