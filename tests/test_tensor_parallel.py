"""Tensor parallelism: two ranks on the CPU (torchrun, gloo) against one process, and what is refused.

The ranks load tiny models saved to a temporary folder with ``DistributedConfig(tp_size=2)`` (see
``parallel_worker.py``); each holds half of every layer's KV heads. On a left-padded batch, under an
attention-scored decode policy and under a prefill compressor, they must generate the tokens one process
generates, with its logits, each rank storing exactly its own heads' share of the single-process cache.
"""

import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import momentkv
import momentkv.engine.patch
from momentkv import PolicyError
from momentkv.engine.parallel import check_tensor_parallel, kv_head_ranks
from models import tiny_model
from parallel_worker import FAMILIES, LAYER_POLICY, MODEL_SHAPE, POLICIES, generate_and_capture, load, save_models

RANKS = 2
WORKER = pathlib.Path(__file__).with_name("parallel_worker.py")
# float32 logits and keys: the rowwise projections (o_proj, down_proj) sum half of their inputs on each rank
# and all-reduce the two partial sums, so the ranks round in another order than one process. Measured on these
# 2-layer models: logits differ by at most 1.8e-7 (at magnitudes up to 0.63), second-layer keys by at most
# 1.0e-6 (Qwen3's key RMSNorm scales them up). 1e-5 bounds that rounding; a token kept or evicted differently
# would move logits by orders of magnitude more, and tokens and positions are compared exactly.
ATOL = 1e-5

gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without the gloo backend",
)
CASES = [(family, name) for family in FAMILIES for name in POLICIES]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The saved models' folder and what each rank of one 2-rank ``torchrun`` recorded."""
    root = tmp_path_factory.mktemp("tensor_parallel")
    models, out = root / "models", root / "out"
    out.mkdir()
    save_models(str(models))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
               str(WORKER), str(models), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    return models, ranks


@pytest.fixture(scope="module")
def single(run):
    """The same generations in this process, on the unsharded models: ``{(family, policy): capture}``."""
    models, _ = run
    captures = {}
    for family in FAMILIES:
        model = load(str(models / family))
        for name, policy in POLICIES.items():
            captures[family, name] = generate_and_capture(model, policy)
    return captures


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("family,policy", CASES)
def test_ranks_generate_the_tokens_and_logits_of_one_process(run, single, family, policy):
    _, ranks = run
    ref = single[family, policy]
    assert ranks[0]["world"] == RANKS
    for rank in ranks:
        got = rank[family][policy]
        assert torch.equal(got["tokens"], ref["tokens"])
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=ATOL)
    # The vocabulary-parallel head gathers one set of logits that every rank receives.
    assert torch.equal(ranks[0][family][policy]["logits"], ranks[1][family][policy]["logits"])


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("family,policy", CASES)
def test_each_rank_stores_its_own_share_of_the_kv_heads(run, single, family, policy):
    _, ranks = run
    ref = single[family, policy]
    kv_heads = MODEL_SHAPE["kv_heads"]
    # The comparison is not trivial: tokens were evicted, and the heads of one layer keep different tokens.
    assert ref["stats"]["evicted"] > 0
    assert any(not torch.equal(layer["positions"][:, 0], layer["positions"][:, 1]) for layer in ref["layers"])
    for idx, whole in enumerate(ref["layers"]):
        shares = [rank[family][policy]["layers"][idx] for rank in ranks]
        batch, _, slots, head_dim = whole["keys"].shape
        for share in shares:
            assert share["keys"].shape == share["values"].shape == (batch, kv_heads // RANKS, slots, head_dim)
        assert whole["valid"] is not None  # the batch is left-padded
        # Rank r holds KV heads [r * kv/RANKS, (r+1) * kv/RANKS): the ranks' caches side by side are the whole.
        assert torch.equal(torch.cat([s["positions"] for s in shares], dim=1), whole["positions"])
        assert torch.equal(torch.cat([s["valid"] for s in shares], dim=1), whole["valid"])
        for name in ("keys", "values"):
            torch.testing.assert_close(torch.cat([s[name] for s in shares], dim=1), whole[name], rtol=0, atol=ATOL)
    for rank in ranks:
        stats = rank[family][policy]["stats"]
        assert stats["kv_bytes"] * RANKS == ref["stats"]["kv_bytes"]
        assert stats["evicted"] == ref["stats"]["evicted"]
        assert [s["stored"] for s in stats["layers"]] == [s["stored"] for s in ref["stats"]["layers"]]
        assert [s["prompt_stored"] for s in stats["layers"]] == [s["prompt_stored"] for s in ref["stats"]["layers"]]


@gloo
@pytest.mark.slow
def test_prefill_compressor_ran_on_the_ranks(run, single):
    """SnapKV kept its capacity of the prompt on every rank (the comparison above covers which slots)."""
    _, ranks = run
    capacity = POLICIES["snapkv"]["prefill"]["capacity"]
    for family in FAMILIES:
        assert all(s["prompt_stored"] == capacity for s in single[family, "snapkv"]["stats"]["layers"])
        for rank in ranks:
            assert all(s["prompt_stored"] == capacity for s in rank[family]["snapkv"]["stats"]["layers"])


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ranks_detect_the_split_and_refuse_layer_granularity(run, family):
    _, ranks = run
    for rank in ranks:
        found = rank[family]["refusals"]
        assert found["ranks"] == RANKS
        assert found["ranks_from_weights"] == RANKS  # from the DTensor shards alone, without transformers' marker
        assert "decode.granularity: layer" in found["check"]
        assert f"each of the {RANKS} ranks holds and scores only 2 of the 4 KV heads" in found["check"]


@gloo
@pytest.mark.slow
@pytest.mark.skipif("check_tensor_parallel" not in inspect.getsource(momentkv.engine.patch),
                    reason="patch() does not call check_tensor_parallel yet")
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_refuses_layer_granularity_on_the_ranks(run, family):
    _, ranks = run
    for rank in ranks:
        found = rank[family]["refusals"]
        assert found["patch"] is not None and found["patch"] == found["check"]


# ------------------------------------------------------------ the check itself, in one process

def _layer_policy():
    return momentkv.load_policy(LAYER_POLICY)


def _marked(model, tp_size: int):
    """``model`` carrying the marker transformers sets on a model it loaded tensor-parallel."""
    model._tp_size = tp_size
    return model


def test_a_model_in_one_process_may_use_layer_granularity():
    model = tiny_model("llama", **MODEL_SHAPE)
    assert kv_head_ranks(model) == 1
    check_tensor_parallel(model, _layer_policy())
    assert kv_head_ranks(_marked(model, 1)) == 1


def test_layer_granularity_is_refused_when_the_kv_heads_are_split():
    model = _marked(tiny_model("llama", **MODEL_SHAPE), 2)
    assert kv_head_ranks(model) == 2
    with pytest.raises(PolicyError) as info:
        check_tensor_parallel(model, _layer_policy())
    message = str(info.value)
    assert message.startswith("moment-layer: decode.granularity: layer")
    assert "only 2 of the 4 KV heads" in message and "use granularity: head" in message
    # Per-head policies, with or without a prefill compressor, and prefill-only policies are exact: accepted.
    for policy in (*POLICIES.values(), "moment.yaml", {"name": "snapkv-only", "prefill": {"type": "snapkv"}}):
        check_tensor_parallel(model, momentkv.load_policy(policy))


def test_a_plan_that_keeps_the_key_projection_whole_splits_no_heads():
    model = _marked(tiny_model("llama", **MODEL_SHAPE), 2)
    model._tp_plan = {name: style for name, style in model.tp_plan.items() if "self_attn" not in name}
    assert kv_head_ranks(model) == 1
    check_tensor_parallel(model, _layer_policy())


def test_kv_heads_that_do_not_split_evenly_are_refused():
    # 3 KV heads, as SmolLM2-135M has, on 2 ranks (transformers itself fails inside the attention's reshape).
    shape = dict(heads=6, kv_heads=3, hidden_size=96)
    model = _marked(tiny_model("llama", **shape), 2)
    with pytest.raises(PolicyError, match="the model's 3 KV heads do not split evenly among 2 tensor-parallel ranks"):
        check_tensor_parallel(model, momentkv.load_policy("moment.yaml"))
    check_tensor_parallel(_marked(tiny_model("llama", **shape), 3), momentkv.load_policy("moment.yaml"))
