"""Each family's row still describes transformers, and a patched model of each family holds its budget.

- The row's facts against the installed transformers' source: the attention ``forward`` hands its keys to the
  cache with ``cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)`` and passes the attention
  function exactly the keywords the row lists (a new keyword, such as a soft-cap or sinks a family starts
  passing, fails here rather than being ignored for a user).
- The sliding rule against what transformers does: the window each layer's module passes to its attention
  function, and, with windows that bind, the patched model generating the stock model's tokens.
- Eviction under binding windows equals the masking oracle (every layer kind of each family at once).
- ``moment.yaml`` on a model of every family holds the budget on every kind of layer the family has
  (global, sliding, NoPE), read from ``handle.stats()``.
- Checkpoint variants with an attention feature the engine does not serve are refused, naming it.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import momentkv
from loops import oracle_run, physical_run
from models import EAGER_ONLY, FAMILIES, prompts, tiny_model
from momentkv import PolicyError
from momentkv.patches import ADAPTERS
from momentkv.patches.base import CACHE_UPDATE_CALL

# Per family, configs whose sliding windows bind within a test (window 6; ``None``: the family never slides).
SLIDING_VARIANTS = {
    "llama": None,
    "olmo2": None,
    "granite": None,
    "mistral": dict(sliding_window=6),
    "phi3": dict(sliding_window=6),  # Phi-3-mini: every layer
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=6),  # every layer
    "olmo3": dict(sliding_window=6),  # three sliding layers to one global
    "smollm3": dict(use_sliding_window=True, sliding_window=6),  # the NoPE layers slide
    "gemma3_text": dict(sliding_window=6),  # every other layer slides (sliding_window_pattern 2)
    "gemma2": dict(sliding_window=6),  # every other layer slides
    "gpt_oss": dict(sliding_window=6),  # every other layer slides
}
# The families whose sliding layers the other oracle tests do not reach with a binding window.
NEW_SLIDING = ("phi3", "qwen3_moe", "olmo3", "smollm3", "gemma3_text", "gemma2", "gpt_oss")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_row_matches_the_attention_source_of_transformers(family):
    adapter = ADAPTERS[family]
    updates, keywords = adapter.attention_source_facts()
    assert updates == [CACHE_UPDATE_CALL]
    assert sorted(keywords) == sorted(adapter.attention_keywords), (
        f"{family}: transformers' {adapter.attention_class} passes {sorted(keywords)} to its attention function, "
        f"the row says {sorted(adapter.attention_keywords)}"
    )
    assert type(tiny_model(family).model.layers[0].self_attn).__name__ == adapter.attention_class


def test_every_family_of_the_tests_has_a_sliding_variant_here():
    assert sorted(SLIDING_VARIANTS) == sorted(FAMILIES)


_SEEN: list = []


def _spy(module, query, key, value, attention_mask, **kwargs):
    _SEEN.append((module.layer_idx, kwargs.get("sliding_window")))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_spy(module, query, key, value, attention_mask, **kwargs):
    """The same, for the families transformers serves with eager attention only (soft-capping, sinks)."""
    _SEEN.append((module.layer_idx, kwargs.get("sliding_window")))
    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("families_spy", _spy)
AttentionMaskInterface.register("families_spy", sdpa_mask)
AttentionInterface.register("families_spy_eager", _eager_spy)
AttentionMaskInterface.register("families_spy_eager", eager_mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_windows_are_on_the_layers_transformers_slides(family):
    variant = SLIDING_VARIANTS[family]
    model = tiny_model(family, layers=4, **(variant or {}))
    windows = ADAPTERS[family].sliding_windows(model.config)
    model.set_attn_implementation("families_spy_eager" if family in EAGER_ONLY else "families_spy")
    _SEEN.clear()
    with torch.no_grad():
        model(**prompts(1, 5))
    assert [w for _, w in sorted(_SEEN)] == windows
    assert (variant is None) == all(w is None for w in windows)
    if variant is not None:
        assert any(w == 6 for w in windows)


@pytest.mark.parametrize("family", [f for f in FAMILIES if SLIDING_VARIANTS[f] is not None])
def test_binding_sliding_windows_generate_the_stock_tokens(family):
    """Budget never reached, windows passed many times: each layer attends to what transformers' layer does
    (same tokens; the logits within rounding, as the slots are no longer in sequence order)."""
    model = tiny_model(family, layers=4, **SLIDING_VARIANTS[family])
    inputs = prompts(batch=3, length=9)
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = model.generate(**inputs, **kwargs)
    with momentkv.patched(model, {"decode": {"budget": 64, "scorers": [{"type": "ema"}]}}) as handle:
        patched = model.generate(**inputs, **kwargs)
        layers = handle.stats()["layers"]
    assert torch.equal(patched.sequences, reference.sequences)
    for ref, got in zip(reference.logits, patched.logits):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    windows = ADAPTERS[family].sliding_windows(model.config)
    for stats, window in zip(layers, windows):
        assert stats["stored"] == (window if window is not None else 9 + 15)


BUDGET, NEW = 16, 30


@pytest.mark.parametrize("family", NEW_SLIDING)
def test_eviction_with_binding_windows_matches_the_masking_oracle(family):
    """Budget 5 (1 sink, 2 recent) and windows of 6 on the family's sliding layers, 4 layers, a left-padded
    batch: physical eviction (SDPA) gives the logits of the full cache with the evicted and out-of-window tokens
    masked (eager), step by step."""
    policy = {"decode": {"budget": 5, "recent": 2, "sinks": 1,
                         "scorers": [{"type": "ema", "alpha": 0.8, "bias_correction": True}]}}
    make = lambda attn: tiny_model(family, attn, layers=4, **SLIDING_VARIANTS[family])  # noqa: E731
    inputs = prompts(batch=3, length=7)
    physical, cache = physical_run(make("sdpa"), policy, inputs, steps=14)
    oracle = oracle_run(make("eager"), policy, inputs, steps=14)
    full, _ = physical_run(make("sdpa"), "full.yaml", inputs, steps=14)
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
    assert (physical - full).abs().max() > 1e-3
    windows = ADAPTERS[family].sliding_windows(make("sdpa").config)
    assert any(w == 6 for w in windows)
    for layer, window in zip(cache.layers, windows):
        assert layer.stored <= (window if window is not None else 7 + 5)


def _layer_kinds(model) -> list[str]:
    config = model.config
    windows = ADAPTERS[config.model_type].sliding_windows(config)
    nope = getattr(config, "no_rope_layers", None)
    return [("sliding" if w is not None else "global") + ("+nope" if nope is not None and not nope[i] else "")
            for i, w in enumerate(windows)]


@pytest.mark.parametrize("family, variant", [(f, "default") for f in FAMILIES] + [
    (f, "sliding") for f in FAMILIES if SLIDING_VARIANTS[f]])
def test_moment_holds_its_budget_on_every_layer_kind(family, variant):
    """moment.yaml (its scorers and protections; the budget brought from 128 to 16 to keep the test short) over
    30 generated tokens: every global layer holds exactly the prompt and 16 generated tokens, having evicted
    the rest; every sliding layer holds at most its window."""
    overrides = SLIDING_VARIANTS[family] if variant == "sliding" else {}
    model = tiny_model(family, layers=4, **overrides)
    inputs = prompts(batch=2, length=9)
    with momentkv.patched(model, {"extends": "moment.yaml", "decode": {"budget": BUDGET}}) as handle:
        assert handle.policy.decode.scorers == momentkv.load_policy("moment.yaml").decode.scorers
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        stats = handle.stats()
    kinds = _layer_kinds(model)
    windows = ADAPTERS[family].sliding_windows(model.config)
    assert stats["seen"] == 9 + NEW - 1
    for layer, kind, window in zip(stats["layers"], kinds, windows):
        assert layer["budget"] == BUDGET
        if window is None:
            assert layer["generated_stored"] == BUDGET and layer["prompt_stored"] == 9, (kind, layer)
            assert layer["evicted"] == NEW - 1 - BUDGET, (kind, layer)
        else:
            assert layer["stored"] <= window, (kind, layer)
    if family == "smollm3":
        assert any("nope" in kind for kind in kinds) and any("nope" not in kind for kind in kinds)
    if variant == "sliding" or family in ("olmo3", "gemma3_text"):
        assert "sliding" in "".join(kinds) and ("global" in "".join(kinds) or all(w for w in windows))


def test_gemma3_bidirectional_attention_is_refused_naming_the_feature():
    model = tiny_model("gemma3_text", use_bidirectional_attention=True)
    before = model.config.to_dict()
    with pytest.raises(PolicyError, match="bidirectional attention .use_bidirectional_attention=True."):
        momentkv.patch(model, "moment.yaml")
    assert model.config.to_dict() == before and "generate" not in model.__dict__
    assert momentkv.handle_of(model) is None

