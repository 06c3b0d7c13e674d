#!/usr/bin/env bash
# One-shot engine check on a CUDA machine: the fused-kernel decode path against the CPU masking oracle,
# half precision on CUDA, and decode speed against long caches (an 8B model's attention shape, bf16) with
# the fused kernel and with the engine's torch single pass, each eager and with the steady-state decode step
# compiled (model.forward = torch.compile(model.forward); its compile time reported apart), plus the compiled
# decode tests with inductor (their whole-model CPU case, which make test skips for its build time).
# Usage: bash benchmarks/gpu_engine.sh OUTDIR   (momentkv and its dependencies importable)
set -uo pipefail
out=${1:-gpu-results}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
(cd /tmp && python3 -m pytest "$repo/tests/test_gpu_engine.py" "$repo/tests/test_kernels.py" -q -p no:cacheprovider 2>&1 \
    | tee "$out/gpu_tests.log")
(cd /tmp && MOMENTKV_TEST_INDUCTOR=1 MOMENTKV_COMPILE_SCORING=1 python3 -m pytest \
    "$repo/tests/test_engine_compiled_decode.py" "$repo/tests/test_core_fused_scoring.py" -q -p no:cacheprovider 2>&1 \
    | tee "$out/gpu_compiled_tests.log")
# The engine reads MOMENTKV_FUSED once, at import: one process per setting.
for fused in 1 0; do
    MOMENTKV_FUSED=$fused python3 - "$out/gpu_attention_heavy_fused$fused.json" <<'PY' 2>&1 | tee -a "$out/gpu_attention_heavy.log"
import json, os, sys, torch
from momentkv.bench import attention_heavy
rows = attention_heavy.run(contexts=(32768, 131072), budget=1024, steps=50, repeats=3,
                           device="cuda", dtype=torch.bfloat16, layers=8, compiled=True)
print(f"MOMENTKV_FUSED={os.environ['MOMENTKV_FUSED']}")
print(attention_heavy.markdown_table(rows))
json.dump(rows, open(sys.argv[1], "w"), indent=2)
PY
done
