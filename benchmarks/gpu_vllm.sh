#!/usr/bin/env bash
# momentkv in vLLM on an NVIDIA GPU: vLLM's CUDA build in its own environment, the end-to-end tests of
# tests/vllm on it, then the concurrency benchmark of docs/vllm.md, in float32 (as the CPU tests and
# benchmark run: TRITON_ATTN) and in bfloat16 with CUDA graphs (FLASH_ATTN).
#
#   bash benchmarks/gpu_vllm.sh [OUT]          (default out/gpu_vllm; needs the package registry in reach)
#
# Environment: VLLM_VERSION (default 0.34.0), VLLM_GPU_VENV (default .venv-vllm-gpu). The transformers-path
# reference the tests compare with is computed on the CPU by `make` in .venv, as `make test-vllm` does.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu_vllm}
env=${VLLM_GPU_VENV:-.venv-vllm-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

make out/vllm/reference.json VLLM_VENV="$env" VLLM_KIND=cuda  # the environment first, then the reference

# The end-to-end tests (tokens against plain vLLM, log-probabilities against the transformers path, the block
# cap, preemption, the server, refusals), on the GPU.
MOMENTKV_VLLM_REFERENCE=out/vllm/reference.json "$env/bin/python" -m pytest tests/vllm -q 2>&1 \
    | tee "$out/tests.txt"

# The benchmark: 32 requests of 1,024 tokens in 384 blocks of 32, plain vLLM against the policies at budget 128.
VLLM_VENV="$env" bash benchmarks/vllm/concurrency.sh "$out/float32" | tee "$out/float32.txt"
VLLM_VENV="$env" CONCURRENCY_ARGS="--dtype bfloat16 --cuda-graphs" \
    bash benchmarks/vllm/concurrency.sh "$out/bfloat16" | tee "$out/bfloat16.txt"
echo "results: $out"
