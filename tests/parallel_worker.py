"""One rank of a tensor-parallel run, started by ``torchrun`` from ``test_tensor_parallel.py``.

    torchrun --standalone --nproc-per-node 2 tests/parallel_worker.py MODELS_DIR OUT_DIR

Each rank loads every tiny model saved under ``MODELS_DIR`` with transformers' tensor parallelism (gloo on the
CPU), generates under each of ``POLICIES`` with :func:`generate_and_capture`, checks the tensor-parallel
refusals, and writes what it saw to ``OUT_DIR/rank{r}.pt``. The test runs :func:`generate_and_capture` in one
process on the same models and compares.
"""

from __future__ import annotations

import os
import sys

import torch

import momentkv
from momentkv.engine.parallel import check_tensor_parallel, kv_head_ranks
from models import prompts, tiny_model

# 8 query heads over 4 KV heads: on 2 ranks each holds 2 KV heads with their 2-query-head groups, so both
# per-head eviction within a rank and grouped-query scoring run on every rank.
FAMILIES = ("llama", "qwen3")
MODEL_SHAPE = dict(heads=8, kv_heads=4)
NEW_TOKENS = 16
POLICIES = {
    # An attention-scored decode policy, budget small enough to evict from the third generated token on.
    "moment": {"extends": "moment.yaml", "name": "moment-tp", "decode": {"budget": 6}},
    # A prefill compressor (SnapKV keeps 6 of the 12 prompt slots per head), then the same decode policy.
    "snapkv": {"extends": "snapkv-moment.yaml", "name": "snapkv-moment-tp",
               "prefill": {"capacity": 6, "window": 3, "kernel": 3}, "decode": {"budget": 6}},
}
LAYER_POLICY = {"extends": "moment.yaml", "name": "moment-layer", "decode": {"budget": 6, "granularity": "layer"}}


def batch():
    """A left-padded batch of 3 prompts of 12 tokens (rows 1 and 2 carry 2 and 4 padding tokens)."""
    return prompts(batch=3, length=12, seed=3)


def save_models(root: str) -> None:
    """Save each family's tiny model (config, weights, generation config) under ``root/<family>``."""
    for family in FAMILIES:
        tiny_model(family, **MODEL_SHAPE).save_pretrained(os.path.join(root, family))


def load(path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()
    model.generation_config.eos_token_id = None  # fixed generation lengths, as in models.tiny_model
    return model


def generate_and_capture(model, policy) -> dict:
    """Greedy generation under ``policy`` on :func:`batch`: tokens, logits, the cache's contents and stats.

    ``layers[i]`` holds layer ``i``'s ``keys``/``values`` ``(batch, kv_heads on this rank, slots, head_dim)``,
    ``positions`` ``(batch, kv_heads, slots)`` (the token index in each slot) and ``valid`` (padding mask).
    """
    with momentkv.patched(model, policy) as handle:
        out = model.generate(**batch(), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        cache = handle.last_cache
        layers = [
            {"keys": layer.keys.clone(), "values": layer.values.clone(), "positions": layer.positions.clone(),
             "valid": None if layer.valid is None else layer.valid.clone()}
            for layer in cache.layers
        ]
        return {"tokens": out.sequences, "logits": torch.stack(out.logits, dim=1), "layers": layers,
                "stats": cache.stats()}


def refusals(model) -> dict:
    """What the tensor-parallel checks say on this model: detected ranks, and the messages of each refusal."""
    policy = momentkv.load_policy(LAYER_POLICY)
    found = {"ranks": kv_head_ranks(model), "check": None, "patch": None}
    try:
        check_tensor_parallel(model, policy)
    except momentkv.PolicyError as err:
        found["check"] = str(err)
    try:
        momentkv.patch(model, policy).remove()
    except momentkv.PolicyError as err:
        found["patch"] = str(err)
    # transformers' marker hidden: the DTensor shards of the key projections alone must show the split.
    marker = model.__dict__.get("_tp_size")
    model._tp_size = None
    found["ranks_from_weights"] = kv_head_ranks(model)
    model._tp_size = marker
    return found


def main(models_dir: str, out_dir: str) -> None:
    from transformers import DistributedConfig

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = {"world": world}
    for family in FAMILIES:
        model = load(os.path.join(models_dir, family), distributed_config=DistributedConfig(tp_size=world))
        result[family] = {name: generate_and_capture(model, policy) for name, policy in POLICIES.items()}
        result[family]["refusals"] = refusals(model)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
