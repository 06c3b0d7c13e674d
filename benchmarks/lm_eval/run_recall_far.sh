#!/usr/bin/env bash
# momentkv_recall_far on all 40 documents: the full cache and the built-in decode policies at a budget, one
# `momentkv lm-eval` run each (run_tasks.sh with this one task, batches of 20), samples logged for paired.py.
# Usage: benchmarks/lm_eval/run_recall_far.sh OUT [BUDGETS] [POLICIES]
#   then: python benchmarks/lm_eval/paired.py OUT momentkv_recall_far
set -euo pipefail
TASKS=momentkv_recall_far BATCH=20 exec "$(dirname "$0")/run_tasks.sh" "$1" "${2:-64 32}" \
    "${3:-recency moment h2o tova moment-paper keydiff lazyeviction raas}"
