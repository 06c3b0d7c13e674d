#!/usr/bin/env bash
# Candidate defaults (the YAML files beside this script) on the two recall measures, beside the built-ins'
# results already saved: the needle test at budget 64 (rows reused from benchmarks/needle, copied into
# benchmarks/default_search/needle first) and momentkv_recall_far on its 40 documents at budget 64 (into
# benchmarks/lm_eval/recall_far, where the built-ins' runs are). Resumable: finished work is skipped.
#   bash benchmarks/default_search/run.sh [CANDIDATES...]
#   then: python benchmarks/lm_eval/paired.py benchmarks/lm_eval/recall_far momentkv_recall_far
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benchmarks/default_search
candidates=("$@")
[ ${#candidates[@]} -gt 0 ] || candidates=(moment-keydiff momentum-keydiff momentum-0.97)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
files=(); for c in "${candidates[@]}"; do files+=("$here/$c.yaml"); done
start=$(date +%s)
.venv/bin/momentkv needle --policies recency.yaml moment.yaml h2o.yaml tova.yaml moment-paper.yaml keydiff.yaml \
    lazyeviction.yaml raas.yaml "${files[@]}" --budgets 64 --distances 32 64 128 256 512 --instances 16 --seed 0 \
    --no-progress --out "$here/needle"
echo "needle $(( $(date +%s) - start )) s"
out=benchmarks/lm_eval/recall_far
for c in "${candidates[@]}"; do
    label="$c@64"
    if [ -n "$(find "$out/$label" -name 'results_*.json' 2>/dev/null | head -1)" ]; then echo "$label done before"; continue; fi
    t=$(date +%s)
    .venv/bin/momentkv lm-eval --model momentkv --model_args "pretrained=smollm2,policy=$here/$c.yaml,budget=64" \
        --tasks momentkv_recall_far --limit 40 --batch_size 20 --device cpu --log_samples --output_path "$out/$label" \
        > "$out/$label.log" 2>&1
    echo "$label $(( $(date +%s) - t ))" | tee -a "$out/wall_seconds.txt"
done
