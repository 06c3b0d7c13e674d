#!/usr/bin/env bash
# One-shot engine check on a CUDA machine: the fused-kernel decode path against the CPU masking oracle,
# half precision on CUDA, and decode speed against long caches (an 8B model's attention shape, bf16).
# Usage: bash benchmarks/gpu_engine.sh OUTDIR   (momentkv and its dependencies importable)
set -uo pipefail
out=${1:-gpu-results}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
(cd /tmp && python3 -m pytest "$repo/tests/test_gpu_engine.py" -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log")
python3 - "$out" <<'PY' 2>&1 | tee "$out/gpu_attention_heavy.log"
import json, os, sys, torch
from momentkv.bench import attention_heavy
rows = {}
for fused in ("1", "0"):
    os.environ["MOMENTKV_FUSED"] = fused
    res = attention_heavy.run(contexts=(32768, 131072), budget=1024, steps=50, repeats=3,
                              device="cuda", dtype=torch.bfloat16, layers=8)
    rows[f"fused={fused}"] = res
    print(f"MOMENTKV_FUSED={fused}")
    print(attention_heavy.markdown_table(res))
json.dump(rows, open(os.path.join(sys.argv[1], "gpu_attention_heavy.json"), "w"), indent=2)
PY
