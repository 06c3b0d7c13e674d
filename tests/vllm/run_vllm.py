"""Greedy generation with vLLM on token-id prompts, written to a JSON file.

    python tests/vllm/run_vllm.py MODEL_DIR REQUEST.json RESULT.json

REQUEST.json: {"prompts": [[token ids], ...], "max_tokens": 32 (or one per prompt), "logprobs": 3}, optionally
"max_model_len", "max_num_seqs" (requests running at once; the others wait and join as one finishes),
"block_size", "num_gpu_blocks" (the KV space in blocks; few force preemption), "max_num_batched_tokens" (with
chunked prefill: a prompt longer than it is prefilled in chunks), "enable_prefix_caching" and
"additional_config" (passed to ``vllm.LLM``, e.g. {"momentkv": {"policy": ...}}); "block_log": true records
momentkv's block cap, one line per request freed (``$MOMENTKV_VLLM_BLOCK_LOG``), into the result's "blocks".
RESULT.json lists, per prompt, the generated token ids and, per step, the top log-probabilities as
[[token_id, logprob], ...] (vLLM's raw log-probabilities: the chosen token's and the top ``logprobs``), and
the vLLM version.

Several engines in one process (one import of vLLM): {"runs": [{"name": ..., "env": {...}, ...}, ...]}, each
entry a request as above (missing keys taken from the top level); ``env`` is set before its engine starts
(the engine-core and worker processes inherit it; e.g. {"VLLM_PLUGINS": "none"} loads no plugin there). An
engine that fails to start is recorded as {"error": type, "message": ...} and the next one runs. The result is
{"vllm": version, "runs": {name: result}} with each run's wall time in seconds (engine start to shutdown)
and that of its ``generate`` call.

vLLM spawns its engine-core and worker processes, which re-import the main module: the work sits under
the ``__main__`` guard, and it runs as a script of its own so that pytest's process never starts vLLM.
The caller sets VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) in the environment.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time


def generate(model_dir: str, request: dict) -> dict:
    from vllm import LLM, SamplingParams

    log = None
    if request.get("block_log"):
        log = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
        os.environ["MOMENTKV_VLLM_BLOCK_LOG"] = log  # the engine-core process inherits it
    options = {"max_num_seqs": "max_num_seqs", "block_size": "block_size", "num_gpu_blocks": "num_gpu_blocks_override",
               "max_num_batched_tokens": "max_num_batched_tokens"}
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=request.get("max_model_len", 512),
        seed=0,
        enable_prefix_caching=request.get("enable_prefix_caching", False),
        **{option: request[key] for key, option in options.items() if key in request},
        **({"enable_chunked_prefill": True} if "max_num_batched_tokens" in request else {}),
        **({"additional_config": request["additional_config"]} if "additional_config" in request else {}),
    )
    counts = request["max_tokens"]
    counts = counts if isinstance(counts, list) else [counts] * len(request["prompts"])
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=request["logprobs"])
              for n in counts]
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"outputs": [], "generate_seconds": round(time.perf_counter() - start, 2)}
    for out in outputs:
        completion = out.outputs[0]
        steps = [
            sorted(([token, entry.logprob] for token, entry in step.items()), key=lambda pair: -pair[1])
            for step in completion.logprobs
        ]
        result["outputs"].append({"tokens": list(completion.token_ids), "logprobs": steps})
    del llm, outputs
    gc.collect()  # shuts the engine core and its worker down before the next engine starts
    if log is not None:
        del os.environ["MOMENTKV_VLLM_BLOCK_LOG"]
        with open(log) as f:
            result["blocks"] = [json.loads(line) for line in f if line.strip()]
        os.unlink(log)
    return result


def main() -> None:
    model_dir, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)

    import vllm

    if "runs" not in request:
        result = {"vllm": vllm.__version__, **generate(model_dir, request)}
    else:
        common = {k: v for k, v in request.items() if k != "runs"}
        result = {"vllm": vllm.__version__, "runs": {}}
        for run in request["runs"]:
            saved = {k: os.environ.get(k) for k in run.get("env", {})}
            os.environ.update(run.get("env", {}))
            start = time.perf_counter()
            try:
                out = generate(model_dir, {**common, **run})
            except Exception as error:  # a refused start-up: recorded, the next engine runs
                out = {"error": type(error).__name__, "message": str(error)}
            out["seconds"] = round(time.perf_counter() - start, 1)
            result["runs"][run["name"]] = out
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            timing = f", generate() {out['generate_seconds']} s" if "generate_seconds" in out else ""
            print(f"run {run['name']}: {out.get('error', 'ok')} in {out['seconds']} s{timing}", flush=True)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
