#!/usr/bin/env bash
# Fidelity of momentkv's vLLM path on held-out prompts at a real budget: the first PROMPTS held-out prompts of
# momentkv's prompt set (chat-templated), NEW_TOKENS greedy tokens (EOS ignored) with the full cache, moment.yaml
# and recency.yaml at BUDGET, once through momentkv's transformers path (.venv, float32, SDPA, momentkv.patch,
# one prompt at a time: benchmarks/vllm/fidelity_reference.py) and once through vLLM (.venv-vllm,
# tests/vllm/run_vllm.py: float32, enforce_eager, logprobs 5, the full cache as plain vLLM with VLLM_PLUGINS=none).
# benchmarks/vllm/fidelity_compare.py then writes the table (RESULTS.md) and the tokens and chosen-token
# log-probabilities of both paths (RESULTS-raw.json); the runs' full outputs and logs stay in OUT.
#   bash benchmarks/vllm/fidelity.sh [OUT] [PROMPTS] [NEW_TOKENS] [BUDGET]
# Defaults: out/vllm/fidelity, 8 prompts, 256 tokens, budget 64; RESULTS=benchmarks/vllm/fidelity-results.md,
# RAW=benchmarks/vllm/fidelity-raw.json. REUSE=1 keeps a run whose output already exists in OUT.
# Each heavy run holds $LOCK (flock) so that it never overlaps another timed benchmark; the wait is not timed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-out/vllm/fidelity}"; prompts="${2:-8}"; tokens="${3:-256}"; budget="${4:-64}"
results="${RESULTS:-benchmarks/vllm/fidelity-results.md}"; raw="${RAW:-benchmarks/vllm/fidelity-raw.json}"
lock="${LOCK:-/tmp/momentkv-bench.lock}"
model=.venv-vllm/models/smollm2
mkdir -p "$out"
touch "$out/times.txt"

# locked NAME COMMAND...: waits for the lock, then runs COMMAND (its output to OUT/NAME.log); appends
# "NAME SECONDS_RUN SECONDS_WAITED" to OUT/times.txt (replacing an earlier line of NAME).
locked() {
    local name="$1"; shift
    local asked; asked=$(date +%s)
    echo "$name: waiting for $lock (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    flock "$lock" bash -c 'date +%s > "$0"; exec "$@"' "$out/$name.start" "$@" > "$out/$name.log" 2>&1 \
        || { tail -40 "$out/$name.log"; echo "$name failed: $out/$name.log"; exit 1; }
    local ended began; ended=$(date +%s); began=$(cat "$out/$name.start")
    sed -i "/^$name /d" "$out/times.txt"
    echo "$name $((ended - began)) $((began - asked))" >> "$out/times.txt"
    echo "$name: $((ended - began)) s (waited $((began - asked)) s for the lock)"
}

.venv/bin/python benchmarks/vllm/fidelity_reference.py "$model" "$out/prompts.json" --prompts "$prompts" --prompts-only
.venv/bin/python benchmarks/vllm/fidelity_request.py "$out/prompts.json" "$out/request.json" \
    --new-tokens "$tokens" --budget "$budget" --logprobs 5 --max-model-len 1024

if [[ "${REUSE:-0}" == 1 && -s "$out/vllm.json" ]]; then echo "vllm: reusing $out/vllm.json"; else
    locked vllm env -u MOMENTKV_VLLM_POLICY VLLM_CPU_KVCACHE_SPACE=1 \
        .venv-vllm/bin/python tests/vllm/run_vllm.py "$model" "$out/request.json" "$out/vllm.json"
    grep '^run ' "$out/vllm.log"
fi
if [[ "${REUSE:-0}" == 1 && -s "$out/transformers.json" ]] \
        && grep -q '"seconds": [0-9.]*}$' "$out/transformers.json"; then echo "transformers: reusing"; else
    locked transformers .venv/bin/python benchmarks/vllm/fidelity_reference.py "$model" "$out/transformers.json" \
        --prompts "$prompts" --new-tokens "$tokens" --budget "$budget" --top 5
    grep -E '^(full|moment|recency|done)' "$out/transformers.log"
fi
.venv/bin/python benchmarks/vllm/fidelity_compare.py "$out" "$results" "$raw"
cat "$results"
