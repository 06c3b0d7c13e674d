"""Greedy generation with plain vLLM on token-id prompts, written to a JSON file.

    python tests/vllm/run_vllm.py MODEL_DIR REQUEST.json RESULT.json

REQUEST.json: {"prompts": [[token ids], ...], "max_tokens": 32, "logprobs": 3}, optionally
"additional_config" (passed to ``vllm.LLM``, e.g. {"momentkv": {"policy": ...}}), "max_model_len" and
"enable_prefix_caching". RESULT.json lists, per prompt,
the generated token ids and, per step, the top log-probabilities as [[token_id, logprob], ...] (vLLM's
raw log-probabilities: the chosen token's and the top ``logprobs``), and the vLLM version.

vLLM spawns its engine-core and worker processes, which re-import the main module: the work sits under
the ``__main__`` guard, and it runs as a script of its own so that pytest's process never starts vLLM.
The caller sets VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) in the environment.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    model_dir, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)

    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=request.get("max_model_len", 512),
        seed=0,
        enable_prefix_caching=request.get("enable_prefix_caching", False),
        **({"additional_config": request["additional_config"]} if "additional_config" in request else {}),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=request["logprobs"]
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"vllm": vllm.__version__, "outputs": []}
    for out in outputs:
        completion = out.outputs[0]
        steps = [
            sorted(([token, entry.logprob] for token, entry in step.items()), key=lambda pair: -pair[1])
            for step in completion.logprobs
        ]
        result["outputs"].append({"tokens": list(completion.token_ids), "logprobs": steps})
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
