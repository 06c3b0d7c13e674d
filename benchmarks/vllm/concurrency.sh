#!/usr/bin/env bash
# K concurrent requests of N tokens in one fixed KV space: plain vLLM, the plugin without a policy, and
# momentkv's policies at budget 128, one configuration per process, one after the other (never two at once:
# the timings are compared). Writes OUT/<config>.json and OUT/results.md (the table for docs/vllm.md).
#   bash benchmarks/vllm/concurrency.sh [OUT] [REQUESTS] [NEW_TOKENS] [BLOCKS]
# Defaults: out/vllm/concurrency, 32 requests (the 16 held-out prompts twice, 61-457 tokens), 1024 tokens,
# 384 blocks of 32 tokens (12,288 tokens of KV): 32 requests need 1,256 blocks to keep every token, 362 at
# budget 128 (each capped at ceil((prompt + 1 + 128) / 32)), so plain vLLM holds about ten at full length.
# Environment: VLLM_VENV (default .venv-vllm); CONFIGS (default: plain none moment.yaml moment-stock-attention
# recency.yaml; moment-stock-attention is moment.yaml with vLLM's attention kernel); CONCURRENCY_ARGS (more
# arguments of concurrency.py, e.g. "--dtype bfloat16 --cuda-graphs" on a GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-out/vllm/concurrency}"; requests="${2:-32}"; tokens="${3:-1024}"; blocks="${4:-384}"
py=${VLLM_VENV:-.venv-vllm}/bin/python
model=${VLLM_VENV:-.venv-vllm}/models/smollm2
mkdir -p "$out"
start=$(date +%s)
for config in ${CONFIGS:-plain none moment.yaml moment-stock-attention recency.yaml}; do
    policy=$config; fused=1
    # moment.yaml with vLLM's own attention kernel for decode steps instead of the scorers' pass (docs/vllm.md)
    if [ "$config" = moment-stock-attention ]; then policy=moment.yaml; fused=0; fi
    budget=(); [[ "$policy" == *.yaml ]] && budget=(--budget 128)
    echo "[$(( $(date +%s) - start )) s] $config (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    MOMENTKV_VLLM_FUSED_ATTENTION=$fused \
    "$py" benchmarks/vllm/concurrency.py "$model" "$out/${config%.yaml}.json" --policy "$policy" "${budget[@]}" \
        --requests "$requests" --new-tokens "$tokens" --blocks "$((blocks + 1))" --block-size 32 ${CONCURRENCY_ARGS:-} \
        2>"$out/${config%.yaml}.log" \
        | tail -1
done
"$py" benchmarks/vllm/concurrency_table.py "$out" > "$out/results.md"
echo "[$(( $(date +%s) - start )) s] done: $out/results.md"
cat "$out/results.md"
