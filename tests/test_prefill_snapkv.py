"""SnapKV's kept set against an independent computation of the SnapKV formula from eager attention weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import momentkv
from models import FAMILIES, prompts, tiny_model

TOL = 1e-5  # attention sums from the SDPA path and from eager weights agree to float32 rounding


def eager_attentions(family: str, inputs: dict, **model_kwargs) -> list[torch.Tensor]:
    """Per layer ``(batch, heads, prompt, prompt)`` attention weights of the unpatched eager model."""
    model = tiny_model(family, attn="eager", **model_kwargs)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return [a.float() for a in out.attentions]


def reference_scores(attn: torch.Tensor, mask: torch.Tensor, window: int, kernel: int, pooling: str, kv_heads: int):
    """SnapKV's scores of the tokens before the window, ``(batch, kv_heads, prompt - window)``.

    The last ``window`` rows of each query head (padding queries dropped) are summed, pooled along the
    tokens with stride 1, then averaged over the query heads that share a KV head.
    """
    b, heads, length, _ = attn.shape
    window = min(window, length)
    rows = attn[:, :, -window:, : length - window] * mask[:, None, -window:, None].float()
    summed = rows.sum(dim=2)  # (b, heads, prefix): heads as channels
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(summed, kernel, stride=1, padding=kernel // 2)
    return pooled.view(b, kv_heads, heads // kv_heads, length - window).mean(dim=2)


def kept_prompt_positions(family: str, inputs: dict, policy: dict, attn: str = "sdpa", **model_kwargs):
    """Per layer, the prompt positions each (row, KV head) keeps, and the layers' stats."""
    model = tiny_model(family, attn=attn, **model_kwargs)
    handle = momentkv.patch(model, policy)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)  # the 2nd step compresses the prompt
    layers = handle.last_cache.layers
    kept = [layer.positions[..., : layer.context_slots].clone() for layer in layers]
    valid = [None if layer.valid is None else layer.valid[..., : layer.context_slots].clone() for layer in layers]
    handle.remove()
    return kept, valid


def assert_snapkv_choice(kept, scores, mask, window, capacity):
    """``kept`` ``(batch, kv, capacity)`` is SnapKV's choice for ``scores``, up to exact ties at the cut."""
    b, kv, _ = kept.shape
    length = mask.shape[1]
    window = min(window, length, capacity)
    for row in range(b):
        real = mask[row].bool()
        for head in range(kv):
            chosen = set(kept[row, head].tolist())
            tail = {p for p in range(length - window, length) if real[p]}
            assert tail <= chosen, "the window's real tokens are always kept"
            prefix_real = [p for p in range(length - min(window, length)) if real[p]]
            n = min(capacity - len(tail), len(prefix_real))
            ours = {p for p in chosen if p in set(prefix_real)}
            assert len(ours) == n
            s = scores[row, head]
            order = sorted(prefix_real, key=lambda p: -float(s[p]))
            ref = set(order[:n])
            if n and ours != ref:
                cut = float(s[order[n - 1]])
                for p in ours ^ ref:  # only tokens tied with the cut may differ
                    assert abs(float(s[p]) - cut) <= TOL, (row, head, p, float(s[p]), cut)
            chosen_padding = [p for p in chosen if not real[p]]
            assert len(chosen_padding) == capacity - len(tail) - n, "padding only fills what real tokens cannot"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_kept_set_matches_reference_formula(family, pooling):
    inputs = prompts(batch=2, length=40, seed=1)
    window, kernel, capacity = 8, 5, 20
    policy = {"prefill": {"type": "snapkv", "capacity": capacity, "window": window, "kernel": kernel,
                          "pooling": pooling}}
    kept, _ = kept_prompt_positions(family, inputs, policy)
    attentions = eager_attentions(family, inputs)
    for layer, attn in enumerate(attentions):
        assert kept[layer].shape == (2, 2, capacity)
        scores = reference_scores(attn, inputs["attention_mask"], window, kernel, pooling, kv_heads=2)
        assert_snapkv_choice(kept[layer], scores, inputs["attention_mask"], window, capacity)


def test_kept_set_under_patched_eager_and_grouped_heads():
    """The eager base implementation and a wider GQA group (8 query heads per KV head) give SnapKV's choice."""
    inputs = prompts(batch=1, length=36, seed=2)
    policy = {"prefill": {"type": "snapkv", "capacity": 15, "window": 6, "kernel": 7}}
    kept, _ = kept_prompt_positions("qwen2", inputs, policy, attn="eager", heads=8, kv_heads=1)
    for layer, attn in enumerate(eager_attentions("qwen2", inputs, heads=8, kv_heads=1)):
        scores = reference_scores(attn, inputs["attention_mask"], 6, 7, "max", kv_heads=1)
        assert_snapkv_choice(kept[layer], scores, inputs["attention_mask"], 6, 15)


def test_window_longer_than_shortest_padded_prompt():
    """A row with fewer real tokens than the window: no NaN, padding never kept over a real token, and a
    row whose real tokens all fit attends to exactly them."""
    length, window, capacity = 30, 12, 16
    inputs = prompts(batch=3, length=length, seed=3)
    inputs["input_ids"][2, :22] = 0
    inputs["attention_mask"][2, :22] = 0  # row 2: 8 real tokens, fewer than the window
    policy = {"prefill": {"type": "snapkv", "capacity": capacity, "window": window, "kernel": 7}}
    kept, valid = kept_prompt_positions("llama", inputs, policy)
    attentions = eager_attentions("llama", inputs)
    for layer, attn in enumerate(attentions):
        scores = reference_scores(attn, inputs["attention_mask"], window, 7, "max", kv_heads=2)
        assert torch.isfinite(scores).all()
        assert_snapkv_choice(kept[layer], scores, inputs["attention_mask"], window, capacity)
        real_kept = inputs["attention_mask"][2][kept[layer][2]].bool()
        assert int(real_kept.sum(-1).min()) == 8  # every real token of row 2, in every head
        assert torch.equal(valid[layer][2], real_kept), "kept padding stays masked"

    model = tiny_model("llama")
    reference = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    with momentkv.patched(model, policy):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    logits, ref_logits = torch.stack(out.logits), torch.stack(reference.logits)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, 2], ref_logits[:, 2], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[2], reference.sequences[2])


def test_capacity_below_window_keeps_the_newest_tokens():
    inputs = prompts(batch=2, length=24, seed=4)
    kept, _ = kept_prompt_positions("mistral", inputs, {"prefill": {"type": "snapkv", "capacity": 5, "window": 8}})
    for positions in kept:
        assert torch.equal(positions, torch.arange(19, 24).expand(2, 2, 5))
