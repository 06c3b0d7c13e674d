#!/usr/bin/env bash
# The tables of docs/lm-eval.md for a run_tasks.sh folder: scores with standard errors (table.py), then the paired
# comparisons against the full cache and recency (paired.py) for each task's pass/fail and graded metric.
# Usage: bash benchmarks/lm_eval/tasks_report.sh OUT > OUT/report.md
set -euo pipefail
out=${1:?folder of run_tasks.sh}
py=${PYTHON:-.venv/bin/python}
"$py" benchmarks/lm_eval/table.py "$out"
for pair in "momentkv_recall exact" "momentkv_recall groups_recalled" "momentkv_count exact" \
            "momentkv_count lines_correct" "momentkv_tally exact" "momentkv_tally words_correct"; do
    echo
    # shellcheck disable=SC2086
    "$py" benchmarks/lm_eval/paired.py "$out" $pair
done
