#!/usr/bin/env bash
# The leaderboard's measure for the candidate defaults: KL to the full cache on the 16 held-out prompts,
# N = 1,024 tokens sampled from the full cache (temperature 0.7, top-p 0.95, seed 0, batches of 8), decode
# budgets 64 and 128, moment.yaml beside the candidates on the same reference (paired intervals against it).
# The reference and every pass are kept in STORE, so a rerun computes only what is missing.
#   bash benchmarks/default_search/kl.sh [STORE] [OUT] [CANDIDATES...]
set -euo pipefail
cd "$(dirname "$0")/../.."
store="${1:-out/lb}"; out="${2:-out/default-search-kl}"; shift $(( $# > 2 ? 2 : $# )) || true
candidates=("$@"); [ ${#candidates[@]} -gt 0 ] || candidates=(momentum-keydiff)
files=(); for c in "${candidates[@]}"; do files+=("benchmarks/default_search/$c.yaml"); done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
.venv/bin/momentkv eval --split heldout --new-tokens 1024 --reference sample --temperature 0.7 --top-p 0.95 \
    --seed 0 --no-free-running --no-full-replay --no-progress --store "$store" --budgets 64 128 \
    --policies moment.yaml "${files[@]}" --baseline moment --out "$out"
echo "kl $(( $(date +%s) - start )) s"
