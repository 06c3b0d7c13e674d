"""Tensor parallelism: what a model whose KV heads are split across ranks can carry.

Under transformers' tensor parallelism (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``
or the older ``tp_plan="auto"``, launched with ``torchrun``), the key and value projections are split
column-wise by head: each rank computes, caches and scores only its own ``num_key_value_heads / N`` KV heads,
with the query heads of their groups. Every decision momentkv makes *per KV head* (eviction with
``granularity: head``, scorer states, prefill compressors such as SnapKV, which average over a head's query
group only) therefore comes out on each rank exactly as it would for those heads in one process.

Two things do not:

- ``granularity: layer`` ranks a layer's tokens by the mean of the ranking over all of its KV heads
  (``momentkv.core.ranking``). On one rank that mean would cover only the rank's own heads, so each rank would
  choose its own victims, unlike one process. An all-reduce of the ranking in every layer at every eviction
  would fix it, at the cost of a collective on the decode path of a cache layer that knows no process group;
  it is refused instead (``granularity: head`` is exact).
- A KV head count that the ranks cannot split evenly: each rank must hold whole heads, which its cache stores
  and evicts on its own (transformers itself then fails inside the attention's reshape).
"""

from __future__ import annotations

import re

from momentkv.errors import PolicyError
from momentkv.policy.schema import Policy

# A tensor-parallel plan entry that splits a layer's key projection by output feature, i.e. by KV head
# (transformers' own test for "the cache holds fewer heads per rank", get_kv_heads_per_rank, reads the same).
_KEY_PROJECTION = re.compile(r"(^|\.)k_proj(\.weight)?$")


def _plan_splits_keys(plan: dict) -> bool:
    return any(_KEY_PROJECTION.search(name) and style == "colwise" for name, style in plan.items())


def _weight_shards(weight) -> int:
    """Ranks among which a ``DTensor`` weight's rows (output features) are split; 1 for a plain tensor."""
    placements = getattr(weight, "placements", None)
    mesh = getattr(weight, "device_mesh", None)
    if placements is None or mesh is None:
        return 1
    shards = 1
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard(0):
            shards *= mesh.size(mesh_dim)
    return shards


def kv_head_ranks(model) -> int:
    """How many ranks share out each layer's KV heads: 1 unless ``model`` is tensor-parallel by head.

    Read from transformers' marker first (``model._tp_size``, set by ``from_pretrained`` with a distributed
    config and read by its own ``generate`` to size a cache per rank) together with a plan that splits the
    key projection; then from the key projections' weights, which a tensor-parallel model holds as ``DTensor``
    shards whoever sharded them (``torch.distributed.tensor.parallel.parallelize_module`` included).
    """
    tp_size = getattr(model, "_tp_size", None) or 1
    if tp_size > 1 and _plan_splits_keys(getattr(model, "tp_plan", None) or {}):
        return tp_size
    layers = getattr(getattr(model, "base_model", model), "layers", None) or []
    projections = [getattr(getattr(layer, "self_attn", None), "k_proj", None) for layer in layers]
    return max((_weight_shards(p.weight) for p in projections if hasattr(p, "weight")), default=1)


def check_tensor_parallel(model, policy: Policy) -> None:
    """Raise :class:`~momentkv.PolicyError` if ``policy`` cannot run exactly on ``model``'s tensor-parallel ranks.

    A model that is not tensor-parallel by head passes whatever the policy. See the module docstring for what
    is refused and why.
    """
    ranks = kv_head_ranks(model)
    if ranks == 1:
        return
    kv_heads = model.config.get_text_config(decoder=True).num_key_value_heads
    if kv_heads % ranks:
        raise PolicyError(
            f"the model's {kv_heads} KV heads do not split evenly among {ranks} tensor-parallel ranks: each rank "
            "must hold whole KV heads, which its cache stores and evicts on its own; run with a number of ranks "
            f"that divides {kv_heads}"
        )
    decode = policy.decode
    if decode is not None and decode.granularity == "layer":
        raise PolicyError(
            f"{policy.name}: decode.granularity: layer ranks a layer's tokens by the mean over all its KV heads, "
            f"but under tensor parallelism each of the {ranks} ranks holds and scores only {kv_heads // ranks} "
            f"of the {kv_heads} KV heads and would average those alone, evicting other tokens than one process "
            "would; use granularity: head (each KV head ranks its own tokens, exact under tensor parallelism) "
            "or run the model in one process"
        )
