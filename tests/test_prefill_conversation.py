"""Conversations continued through the same cache under a prefill compressor.

The unit of compression is the context fed since the last generated token: the prompt (in however many
chunks), then each later user turn on its own, compressed once when it is complete, with its own last
queries as the observation window; earlier context is kept as it was.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import momentkv
from loops import positions_for
from models import prompts, tiny_model
from momentkv.prefill.base import PrefillContext, prefill_class

COMPRESSORS = {
    "snapkv": {"type": "snapkv", "capacity": 8, "window": 4, "kernel": 3, "pooling": "avg"},
    "pyramidkv": {"type": "pyramidkv", "capacity": 8, "window": 2, "beta": 4.0},
    "pyramidkv-schedule": {"type": "pyramidkv", "schedule": [9, 5], "window": 3, "kernel": 1},
    "streamingllm": {"type": "streamingllm", "capacity": 7, "sinks": 2},
    "knorm": {"type": "knorm", "capacity": 0.5},
}


class Chat:
    """A chat loop by hand: chunks of context and tokens generated one at a time, through a patched model."""

    def __init__(self, model, policy, inputs: dict, prompt_length: int | None = None, seed: int = 0):
        self.model, self.handle = model, momentkv.patch(model, policy)
        self.cache = self.handle.new_cache(prompt_length=prompt_length)
        self.ids, self.mask = inputs["input_ids"], inputs["attention_mask"]
        self.batch = self.ids.shape[0]
        self.fed = 0  # columns of ids fed so far
        self.g = torch.Generator().manual_seed(seed)

    def _append(self, count: int) -> None:
        tokens = torch.randint(3, 128, (self.batch, count), generator=self.g)
        self.ids = torch.cat([self.ids, tokens], dim=-1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=-1)

    @torch.no_grad()
    def feed(self, pieces: list[int]):
        """Feed the next ``sum(pieces)`` tokens (new random ones past the prompt) in forwards of these sizes."""
        out = None
        for size in pieces:
            if self.fed + size > self.ids.shape[1]:
                self._append(self.fed + size - self.ids.shape[1])
            end = self.fed + size
            mask = self.mask[:, :end]
            out = self.model(input_ids=self.ids[:, self.fed : end], attention_mask=mask,
                             position_ids=positions_for(mask)[:, self.fed : end], cache=self.cache, use_cache=True)
            self.fed = end
        return out

    def generate(self, steps: int) -> None:
        self.feed([1] * steps)

    def turn(self, pieces: list[int], tell: bool = False) -> int:
        """A user turn; ``tell``: say how long it is first (``cache.expect``), as ``generate`` does. Returns
        the sequence index of its first token."""
        first = self.fed
        if tell:
            self.cache.expect(first + sum(pieces))
        self.feed(pieces)
        return first


def context_of(layer):
    """The context slots of a ``scope: decode`` layer: positions, keys, values."""
    c = layer.context_slots
    return layer.positions[..., :c].clone(), layer.keys[:, :, :c].clone(), layer.values[:, :, :c].clone()


def held(layer, start: int, end: int) -> torch.Tensor:
    """How many tokens of the sequence indices ``[start, end)`` each (row, KV head) holds."""
    return ((layer.positions >= start) & (layer.positions < end)).sum(-1)


def test_a_later_turn_is_compressed_on_its_own_and_earlier_context_kept():
    """The reported case: a 20-token prompt, 3 generated tokens, a 12-token turn, SnapKV capacity 8 plus a
    decode budget. The turn keeps 8 tokens (its last 4, the window, among them) and the prompt's 8 kept
    tokens stay exactly as they were (before: 2 to 8 of the turn's tokens and 0 to 4 of the prompt's)."""
    policy = {"prefill": {"type": "snapkv", "capacity": 8, "window": 4},
              "decode": {"budget": 4, "scorers": [{"type": "ema"}]}}
    chat = Chat(tiny_model("llama"), policy, prompts(batch=1, length=20, seed=3))
    chat.feed([20])
    chat.generate(3)  # the first step compresses the prompt
    before = [context_of(layer) for layer in chat.cache.layers]
    first = chat.turn([12])
    chat.generate(1)
    chat.handle.remove()
    for layer, (positions, keys, values) in zip(chat.cache.layers, before):
        assert layer.context_slots == 16
        assert bool((held(layer, 0, 20) == 8).all()), "the prompt keeps its capacity"
        assert bool((held(layer, first, first + 12) == 8).all()), "the turn keeps its own capacity"
        assert bool((held(layer, first + 8, first + 12) == 4).all()), "the turn's window is kept"
        assert torch.equal(layer.positions[..., :8], positions)
        assert torch.equal(layer.keys[:, :, :8], keys) and torch.equal(layer.values[:, :, :8], values)


def split(draw, total: int, tell: bool) -> list[int]:
    """``total`` tokens in forwards of drawn sizes; a one-token forward only when the cache is told."""
    pieces, left = [], total
    while left:
        size = draw(st.integers(1 if tell else min(2, left), left))
        if not tell and left - size == 1:  # a lone last token would be taken as generated
            size = left
        pieces.append(size)
        left -= size
    return pieces


@st.composite
def conversations(draw):
    tell = draw(st.booleans())
    prompt = draw(st.integers(2, 24))
    turns = [(draw(st.integers(1, 4)), draw(st.integers(2, 16))) for _ in range(draw(st.integers(1, 3)))]
    return {
        "compressor": draw(st.sampled_from(sorted(COMPRESSORS))),
        "scope": draw(st.sampled_from(["decode", "all"])),
        "batch": draw(st.integers(1, 2)),
        "tell": tell,
        "prompt": split(draw, prompt, tell),
        "turns": [(steps, split(draw, length, tell)) for steps, length in turns],
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conversations())
def test_earlier_turns_stay_bit_identical_and_each_turn_keeps_its_capacity(case):
    """Whatever the chunking (the cache told the lengths or not), compressor and scope: after each turn, the
    context kept before it is bit-identical, and the turn holds its own capacity (for its own length) in
    every head; the prompt, fed in several forwards, is compressed as one prompt."""
    compressor = COMPRESSORS[case["compressor"]]
    # scope: all with a budget that is never reached: what stays is what the compressor keeps.
    policy = {"prefill": compressor, "decode": {"budget": 4 if case["scope"] == "decode" else 500,
                                                "scope": case["scope"], "scorers": [{"type": "ema"}]}}
    length = sum(case["prompt"])
    model = tiny_model("llama")
    chat = Chat(model, policy, prompts(batch=case["batch"], length=length, seed=length),
                prompt_length=length if case["tell"] else None)
    chat.feed(case["prompt"])
    spans = [(0, length)]
    comp = prefill_class(compressor["type"])(**compressor)
    num_layers = model.config.num_hidden_layers
    try:
        for steps, pieces in case["turns"]:
            chat.generate(steps)  # the first step compresses the turn before
            if case["scope"] == "decode":
                before = [context_of(layer) for layer in chat.cache.layers]
            else:
                before = [(layer.positions.clone(), layer.keys.clone(), layer.values.clone())
                          for layer in chat.cache.layers]
            first = chat.turn(pieces, tell=case["tell"])
            spans.append((first, first + sum(pieces)))
            chat.generate(1)
            for idx, (layer, (positions, keys, values)) in enumerate(zip(chat.cache.layers, before)):
                n = positions.shape[-1]
                assert torch.equal(layer.positions[..., :n], positions)
                assert torch.equal(layer.keys[:, :, :n], keys) and torch.equal(layer.values[:, :, :n], values)
                for start, end in spans:
                    cap = comp.layer_capacity(end - start, idx, num_layers)
                    assert bool((held(layer, start, end) == min(cap, end - start)).all()), (idx, start, end)
    finally:
        chat.handle.remove()


class WeightsProbe:
    """The attention weights each layer's attention module returns (eager) on the next forward."""

    def __init__(self, model):
        self.weights, self.hooks = {}, []
        for idx, block in enumerate(model.model.layers):
            self.hooks.append(block.self_attn.register_forward_hook(self._hook(idx)))

    def _hook(self, idx):
        def hook(module, args, output):
            self.weights[idx] = output[1].float()
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("scope", ["decode", "all"])
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_a_turn_keeps_what_its_compressor_chooses_from_it_alone(name, scope):
    """The independent computation: the turn's own keys (as stored) and the attention its last queries gave
    its tokens (the eager weights the model returned during the turn, over every key it attended to: the
    compressed prompt, the generated tokens left by eviction) go into the compressor alone, with the
    capacity for the turn's length; the layer keeps exactly those of the turn's tokens, in every row and
    KV head. Left-padded batch; with ``scope: decode`` the generated tokens sit after the turn in slot
    order, so the turn's columns are not the last ones."""
    compressor = COMPRESSORS[name]
    policy = {"prefill": compressor,
              "decode": {"budget": 2 if scope == "decode" else 500, "scope": scope, "scorers": [{"type": "ema"}]}}
    model = tiny_model("qwen2", attn="eager")
    chat = Chat(model, policy, prompts(batch=2, length=20, seed=7))
    chat.feed([20])
    chat.generate(3)
    probe = WeightsProbe(model)
    first = chat.turn([12])
    probe.remove()
    chunks = []
    for layer in chat.cache.layers:
        end = layer.context_slots if scope == "decode" else layer.stored
        assert torch.equal(layer.positions[..., end - 12 : end],
                           torch.arange(first, first + 12).expand(2, 2, 12))
        chunks.append((end - 12, end, layer.keys[:, :, end - 12 : end].clone()))
    chat.generate(1)
    chat.handle.remove()
    comp = prefill_class(compressor["type"])(**compressor)
    for idx, (layer, (start, end, keys)) in enumerate(zip(chat.cache.layers, chunks)):
        attention = None
        if comp.window_size():
            w = min(comp.window_size(), 12)
            rows = probe.weights[idx][:, :, -w:, start:end]  # (b, heads, w, 12)
            attention = rows.view(2, 2, 2, w, 12)  # query heads grouped per KV head
        ctx = PrefillContext(layer_idx=idx, num_layers=2, keys=keys, window_attention=attention,
                             valid=torch.ones(2, 12, dtype=torch.bool))
        cap = comp.layer_capacity(12, idx, 2)
        expected = (comp.select(ctx, cap).sort(dim=-1).values + first if cap < 12
                    else torch.arange(first, first + 12).expand(2, 2, 12))
        kept = layer.positions[(layer.positions >= first) & (layer.positions < first + 12)]
        assert torch.equal(kept.view(expected.shape).sort(dim=-1).values, expected), (idx, name)


@pytest.mark.parametrize("pieces,tell", [([5, 7], False), ([4, 4, 4], False), ([11, 1], True), ([1] * 12, True)])
def test_a_turn_fed_in_pieces_is_compressed_as_one_turn(pieces, tell):
    """A turn fed in several forwards (a lone token only once the cache is told the turn's length) keeps
    exactly the tokens it keeps when fed in one forward: the window spans the pieces."""
    policy = {"prefill": {"type": "snapkv", "capacity": 6, "window": 5, "pooling": "avg"},
              "decode": {"budget": 3, "scorers": [{"type": "ema"}]}}
    kept = []
    for split_turn, told in (([12], False), (pieces, tell)):
        chat = Chat(tiny_model("mistral"), policy, prompts(batch=2, length=16, seed=9), seed=1)
        chat.feed([16])
        chat.generate(2)
        chat.turn(split_turn, tell=told)
        chat.generate(1)
        chat.handle.remove()
        kept.append([context_of(layer)[0] for layer in chat.cache.layers])
    for whole, pieced in zip(*kept):
        assert whole.shape[-1] == 12
        assert torch.equal(whole, pieced)


def test_generate_continues_a_conversation_and_compresses_only_the_new_turn():
    """The README's conversation example on a tiny model with SnapKV: the second ``generate`` feeds the
    turn (with the first answer's last token) as one chunk; it keeps its capacity, the first prompt's kept
    tokens are untouched, and feeding the turn in chunks (``prefill_chunk_size``) keeps the same tokens."""
    policy = {"prefill": {"type": "snapkv", "capacity": 8, "window": 4},
              "decode": {"budget": 4, "scorers": [{"type": "ema"}]}}
    inputs = prompts(batch=1, length=20, seed=4)
    turn = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    results = []
    for chunk in (None, 5):
        model = tiny_model("qwen3")
        with momentkv.patched(model, policy) as handle:
            first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            cache = handle.last_cache
            prompt_kept = [context_of(layer) for layer in cache.layers]
            conversation = torch.cat([first, turn], dim=-1)
            extra = {} if chunk is None else {"prefill_chunk_size": chunk}
            second = model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                    cache=cache, max_new_tokens=5, do_sample=False, **extra)
        assert second.shape[1] == conversation.shape[1] + 5
        fed = first.shape[1] - 1  # the first answer's last token was never fed: it opens the second chunk
        for layer, (positions, keys, values) in zip(cache.layers, prompt_kept):
            assert positions.shape[-1] == 8
            assert torch.equal(layer.positions[..., :8], positions) and torch.equal(layer.keys[:, :, :8], keys)
            assert bool((held(layer, fed, conversation.shape[1]) == 8).all())
            assert layer.context_slots == 16
            assert layer.stored - layer.context_slots <= 4
        results.append((second, [layer.positions[..., :16].clone() for layer in cache.layers]))
    (whole, whole_kept), (chunked, chunked_kept) = results
    assert torch.equal(whole, chunked)
    for a, b in zip(whole_kept, chunked_kept):
        assert torch.equal(a, b)
