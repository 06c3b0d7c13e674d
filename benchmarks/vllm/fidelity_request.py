"""The request for ``tests/vllm/run_vllm.py``: the fidelity benchmark's three vLLM engines, one process.

    python benchmarks/vllm/fidelity_request.py PROMPTS.json REQUEST.json [--new-tokens 256] [--budget 64]
        [--logprobs 5] [--max-model-len 1024]

PROMPTS.json is what ``fidelity_reference.py --prompts-only`` writes. Runs: ``moment`` and ``recency``
(``moment.yaml`` / ``recency.yaml`` at ``--budget`` through ``additional_config``), then ``full`` (plain vLLM,
``VLLM_PLUGINS=none``; last, see :func:`runs`). Standard library only.
"""

from __future__ import annotations

import argparse
import json


def runs(budget: int) -> list[dict]:
    def policy(name: str) -> dict:
        return {"additional_config": {"momentkv": {"policy": {"extends": name, "decode": {"budget": budget}}}}}

    # The full cache runs last. vLLM loads its general plugins once per process (vllm.plugins.plugins_loaded):
    # had the first engine been started with VLLM_PLUGINS=none, the main process would never load momentkv's
    # plugin, nothing would read additional_config["momentkv"], and the policy engines would silently run the
    # full cache (fidelity_compare.py refuses outputs bit-identical to the full cache's for that reason).
    return [
        {"name": "moment", **policy("moment.yaml")},
        {"name": "recency", **policy("recency.yaml")},
        {"name": "full", "env": {"VLLM_PLUGINS": "none"}},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()
    with open(args.prompts) as f:
        prompts = json.load(f)["prompts"]
    longest = max(len(p) for p in prompts) + args.new_tokens
    if longest > args.max_model_len:
        raise SystemExit(f"--max-model-len {args.max_model_len} is below the longest request ({longest} tokens)")
    request = {"prompts": prompts, "max_tokens": args.new_tokens, "logprobs": args.logprobs,
               "max_model_len": args.max_model_len, "runs": runs(args.budget)}
    with open(args.out, "w") as f:
        json.dump(request, f)


if __name__ == "__main__":
    main()
