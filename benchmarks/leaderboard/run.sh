#!/usr/bin/env bash
# The leaderboard runs on the held-out prompts, one stage at a time, every pass saved in STORE as it finishes
# (a stage that is started again loads what the store holds and computes only what is missing), then one
# report of everything saved against the N-token reference.
#   bash benchmarks/leaderboard/run.sh STAGE [NEW_TOKENS] [STORE] [OUT]
# STAGE: decode (budgets 64 and 128, every decode policy), ends (budgets 32 and 256, the leading ones),
#        long (budgets 64 and 128, the leading ones; for N = 2048: run.sh long 2048),
#        total (equal total memory 512: prompt-intact against whole-cache), kvpress (its presses at total 512),
#        report (merge the store's passes into OUT/report, and those at total budgets into OUT/report-total,
#        compared there with kvpress's TOVA press, or TOTAL_BASELINE).
# PRESSES and INTERVALS choose the kvpress presses and compression intervals (default: interval 1; "default" is
# DecodingPress's own); KVPRESS_ARGS adds options to the kvpress runner (e.g. "--no-full --threads 1").
# Policies run in the order given, most informative first, so an interrupted stage still leaves the main rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage="${1:?stage: decode, ends, long, total, kvpress or report}"; n="${2:-1024}"
store="${3:-out/lb}"; out="${4:-out/lb-$n}"
decode_policies="${DECODE_POLICIES:-recency.yaml moment.yaml tova.yaml h2o.yaml keydiff.yaml lazyeviction.yaml raas.yaml scope.yaml moment-paper.yaml}"
long_policies="${LONG_POLICIES:-recency.yaml moment.yaml h2o.yaml tova.yaml}"
total_policies="${TOTAL_POLICIES:-recency.yaml moment.yaml tova-all.yaml moment-all.yaml h2o-all.yaml recency-all.yaml}"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
eval_run() {
    .venv/bin/momentkv eval --split heldout --new-tokens "$n" --reference sample --temperature 0.7 --top-p 0.95 \
        --seed 0 --no-free-running --no-progress --store "$store" "$@"
}
# The reference a stage's passes are read against: decode budgets batch the prompts (8 at a time), total budgets
# run each prompt alone, and each batch size has its own saved reference (the batch changes the rounding).
reference() {
    for folder in "$store"/smollm2-N"$n"-P16-*; do
        grep -qE "\"batch_size\": $1([^0-9]|$)" "$folder/reference.json" 2>/dev/null && { echo "$folder"; return; }
    done
    echo "no reference at batch size $1 in $store (run the ${2} stage first)" >&2; exit 1
}
case "$stage" in
    decode)
        eval_run --budgets 64 128 --policies $decode_policies --out "$out/decode"
        # R-KV and G-KV rank every 128 steps (their cadence), which a budget of 64 does not allow.
        eval_run --budgets 128 --policies rkv.yaml gkv.yaml --out "$out/decode-cadence" ;;
    ends)   eval_run --budgets 32 256 --policies recency.yaml moment.yaml tova.yaml h2o.yaml --out "$out/ends" ;;
    # The full cache's replay is a check (KL 0 at the same batch size) that costs most at a long N: skipped.
    long)   eval_run --budgets 64 128 --no-full-replay --policies $long_policies --out "$out/long" ;;
    # Each prompt alone against a reference made alone: the full cache replays it exactly, so it is not replayed.
    total)  eval_run --total-budgets 512 --no-full-replay --policies $total_policies --out "$out/total" ;;
    kvpress)
        ref=$(reference 1 total)
        bash benchmarks/peers/kvpress/setup.sh > /dev/null
        benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run.py --reference "$ref" \
            --total-budgets 512 --intervals ${INTERVALS:-1} \
            --presses ${PRESSES:-tova keydiff streaming_llm knorm expected_attention} --skip-done ${KVPRESS_ARGS:-} ;;
    report)
        ref=$(reference 8 decode); .venv/bin/momentkv report "$ref" --out "$out/report"
        # Total budgets have their own reference, made one prompt at a time; an N without one has no such report.
        if ref=$(reference 1 total 2>/dev/null); then
            .venv/bin/momentkv report "$ref" --out "$out/report-total" --baseline "${TOTAL_BASELINE:-kvpress-tova-i1}"
        else echo "no total-budget reference at N = $n: no report-total"; fi ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
esac
stamp "$stage done"
