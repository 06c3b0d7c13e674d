#!/usr/bin/env bash
# The table of docs/lm-eval.md: SmolLM2-135M-Instruct on the momentkv_long tasks, the full cache and four
# policies at two decode budgets, one `momentkv lm-eval` run each; prints each run's wall time.
# Usage: benchmarks/lm_eval/run_smollm2.sh OUT [LIMIT]    (then: python benchmarks/lm_eval/table.py OUT)
set -euo pipefail
OUT=${1:?output folder}
LIMIT=${2:-10}
BIN=${MOMENTKV:-.venv/bin/momentkv}
# One thread: on a shared 2-core machine, two OpenMP threads spin while they wait for each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
run() {  # label, model arguments
    local start end
    start=$(date +%s)
    "$BIN" lm-eval --model momentkv --model_args "pretrained=smollm2,$2" --tasks momentkv_long \
        --limit "$LIMIT" --batch_size "$LIMIT" --device cpu --log_samples --output_path "$OUT/$1" \
        > "$OUT/$1.log" 2>&1
    end=$(date +%s)
    echo "$1 $((end - start))" | tee -a "$OUT/wall_seconds.txt"
}
run full policy=full.yaml
for budget in 32 64; do
    for policy in recency h2o tova moment; do
        run "$policy@$budget" "policy=$policy.yaml,budget=$budget"
    done
done
