"""patches/: every family the tests build has an adapter, every adapter a test model, and each row's facts
hold for transformers (the module defines the eager attention, sliding windows land on the right layers)."""

from __future__ import annotations

import importlib

import pytest

from models import FAMILIES, tiny_model
from momentkv.patches import ADAPTERS, SUPPORTED_MODEL_TYPES, FamilyAdapter, adapter_for
from momentkv.patches.families import FAMILIES as ROWS


def test_every_tested_family_has_an_adapter_and_every_adapter_a_test_model():
    assert sorted(FAMILIES) == list(SUPPORTED_MODEL_TYPES) == sorted(ADAPTERS)
    assert [row.model_type for row in ROWS] == list(ADAPTERS)  # one row per family, none twice
    for family in FAMILIES:
        assert adapter_for(tiny_model(family).config.model_type) is ADAPTERS[family]
    assert adapter_for("gpt2") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_module_named_defines_the_family_attention(family):
    adapter = ADAPTERS[family]
    model = tiny_model(family)
    attention_module = type(model.model.layers[0].self_attn).__module__
    assert attention_module == adapter.modeling_module
    assert adapter.eager_attention() is importlib.import_module(attention_module).eager_attention_forward


def test_sliding_windows_follow_each_family_rule():
    assert ADAPTERS["llama"].sliding_windows(tiny_model("llama", layers=3).config) == [None] * 3
    assert ADAPTERS["mistral"].sliding_windows(tiny_model("mistral", layers=3, sliding_window=8).config) == [8] * 3
    assert ADAPTERS["mistral"].sliding_windows(tiny_model("mistral", layers=2).config) == [None, None]
    for family in ("qwen2", "qwen3"):
        config = tiny_model(family, layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1).config
        expected = [8 if kind == "sliding_attention" else None for kind in config.layer_types]
        assert ADAPTERS[family].sliding_windows(config) == expected
        assert expected.count(8) == 2  # layers from max_window_layers on slide
        assert ADAPTERS[family].sliding_windows(tiny_model(family, layers=3).config) == [None] * 3


def test_an_unknown_sliding_rule_is_refused():
    with pytest.raises(ValueError, match="sliding must be one of none, all_layers, layer_types"):
        FamilyAdapter("gemma", "transformers.models.gemma.modeling_gemma", "alternate")
