#!/usr/bin/env bash
# momentkv_long tasks on all 40 documents: the full cache and the built-in decode policies at each budget, one
# `momentkv lm-eval` run each, samples logged for the paired comparisons of paired.py; prints wall times.
# A rerun skips every run whose results file exists (delete a run's folder to redo it).
# Usage: benchmarks/lm_eval/run_tasks.sh OUT [BUDGETS] [POLICIES]
#   environment: TASKS (comma-separated lm-eval task names; default the three tasks of momentkv_long other
#   than momentkv_recall_far), BATCH (documents per batch; default 40), MOMENTKV (the command)
#   then: python benchmarks/lm_eval/paired.py OUT TASK [METRIC]
set -euo pipefail
OUT=${1:?output folder}
BUDGETS=${2:-"64 32"}
POLICIES=${3:-"recency moment h2o tova moment-paper keydiff lazyeviction raas momentum-keydiff"}
TASKS=${TASKS:-momentkv_count,momentkv_recall,momentkv_tally}
BATCH=${BATCH:-40}
BIN=${MOMENTKV:-.venv/bin/momentkv}
# One thread: on a shared 2-core machine, two OpenMP threads spin while they wait for each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
run() {  # label, model arguments
    local start end
    if [ -n "$(find "$OUT/$1" -name 'results_*.json' 2>/dev/null | head -1)" ]; then
        echo "$1 done before"
        return
    fi
    start=$(date +%s)
    "$BIN" lm-eval --model momentkv --model_args "pretrained=smollm2,$2" --tasks "$TASKS" \
        --limit 40 --batch_size "$BATCH" --device cpu --log_samples --output_path "$OUT/$1" > "$OUT/$1.log" 2>&1
    end=$(date +%s)
    echo "$1 $((end - start))" | tee -a "$OUT/wall_seconds.txt"
}
[ "${SKIP_FULL:-0}" = 1 ] || run full policy=full.yaml
for budget in $BUDGETS; do
    for policy in $POLICIES; do
        run "$policy@$budget" "policy=$policy.yaml,budget=$budget"
    done
done
