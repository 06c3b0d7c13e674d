#!/usr/bin/env bash
# The leaderboard pipeline end to end on a small scale: two held-out prompts (one free, one grounded), a
# sampled reference, momentkv policies at a decode budget and at a total budget, kvpress's decoding presses
# at the same total on the same reference, then one report of everything. Every pass is saved in STORE as it
# finishes, so an interrupted run continues where it stopped when started again.
#   bash benchmarks/leaderboard/smoke.sh [NEW_TOKENS] [DECODE_BUDGET] [TOTAL_BUDGET] [STORE] [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-1024}"; budget="${2:-64}"; total="${3:-320}"
store="${4:-out/leaderboard-store}"; out="${5:-out/leaderboard-smoke}"
kvp=benchmarks/peers/kvpress/.venv/bin/python
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
eval_run() {  # momentkv passes against the shared reference (saved ones are loaded, not recomputed)
    .venv/bin/momentkv eval --prompts benchmarks/leaderboard/smoke-prompts.jsonl --new-tokens "$n" \
        --reference sample --temperature 0.7 --top-p 0.95 --seed 0 --batch-size 1 --no-free-running --no-progress \
        --store "$store" --out "$out/momentkv" "$@"
}
kvpress_run() {
    "$kvp" benchmarks/peers/kvpress/run.py --reference "$(ls -d "$store"/*-N"$n"-P2-*)" --total-budgets "$total" \
        --skip-done "$@"
}
bash benchmarks/peers/kvpress/setup.sh > /dev/null
stamp "reference and the whole-cache policies"
eval_run --policies recency-all.yaml tova-all.yaml --total-budgets "$total"
stamp "kvpress: full cache, TOVA and KNorm at interval 1"
kvpress_run --presses tova knorm --intervals 1
stamp "momentkv: decode budget $budget and prompt-intact at total $total"
eval_run --policies recency.yaml moment.yaml --budgets "$budget"
eval_run --policies recency-all.yaml tova-all.yaml moment-all.yaml recency.yaml --total-budgets "$total"
stamp "kvpress: the other presses"
kvpress_run --presses expected_attention keydiff streaming_llm --intervals 1 --no-full
kvpress_run --presses tova --intervals default --no-full
stamp "report"
.venv/bin/momentkv report "$(ls -d "$store"/*-N"$n"-P2-*)" --out "$out/report"
stamp "done"
