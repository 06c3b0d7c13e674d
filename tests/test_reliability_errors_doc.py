"""docs/errors.md quotes every PolicyError message the engine can raise, and the quoted errors are real."""

import ast
import pathlib
import re

import pytest
import torch
from transformers import DynamicCache

import momentkv
from momentkv import PolicyError, Scorer
from scratch import scratch_scorer
from models import prompts, tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = re.sub(r"\s+", " ", (ROOT / "docs" / "errors.md").read_text())


def _engine_message_pieces():
    """The longest literal piece of every ``PolicyError(...)`` message in momentkv/engine (>= 12 characters)."""
    for path in sorted((ROOT / "momentkv" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PolicyError":
                pieces = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                piece = max(pieces, key=len, default="").strip(" :;")
                if len(piece) >= 12:
                    yield pytest.param(piece, id=f"{path.name}:{node.lineno}")


PIECES = list(_engine_message_pieces())


def test_the_engine_raises_policy_errors():
    assert len(PIECES) >= 10


@pytest.mark.parametrize("piece", PIECES)
def test_every_engine_message_is_documented(piece):
    assert re.sub(r"\s+", " ", piece) in DOC


def _stale_cache():
    model = tiny_model("llama")
    handle = momentkv.patch(model, {"decode": {"budget": 2, "scorers": [{"type": "ema"}]}})
    cache = handle.new_cache()
    handle.remove()  # the attention function no longer reports to the cache
    inputs = prompts(1, 3)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
        model(input_ids=inputs["input_ids"][:, :1], cache=cache, use_cache=True)
        model(input_ids=inputs["input_ids"][:, :1], cache=cache, use_cache=True)


def _patch(model_fn, policy="moment.yaml"):
    return lambda: momentkv.patch(model_fn(), policy)


def _generate(**kwargs):
    def run():
        model = tiny_model("llama")
        with momentkv.patched(model, "moment.yaml"):
            model.generate(**prompts(1, 3), max_new_tokens=2, **kwargs)
    return run


def _no_layers():
    model = tiny_model("llama")
    del model.model.layers
    return model


class _WrongShape(Scorer):
    needs_attention = False

    def update(self, ctx):
        return ctx.positions[..., :1].float()


def _wrong_shape():
    model = tiny_model("llama")
    with scratch_scorer("errors_doc_wrong_shape", _WrongShape), \
            momentkv.patched(model, {"decode": {"budget": 2, "scorers": [{"type": "errors_doc_wrong_shape"}]}}):
        model.generate(**prompts(1, 3), max_new_tokens=5)


def _pickled():
    import pickle

    model = tiny_model("llama")
    momentkv.patch(model)
    pickle.dumps(model)


def _dynamic_cache_loop():
    model = tiny_model("llama")
    momentkv.patch(model, {"decode": {"budget": 2, "scorers": [{"type": "ema"}]}})
    inputs = prompts(1, 3)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        model(input_ids=inputs["input_ids"][:, :1], cache=cache, use_cache=True)


def _switched_attention():
    model = tiny_model("llama")
    handle = momentkv.patch(model)
    model.config._attn_implementation = "flex_attention"
    handle.new_cache()


TRIGGERS = {
    "not_a_model": lambda: momentkv.patch(object()),
    "base_model": _patch(lambda: tiny_model("llama").model),
    "scorer_shape": _wrong_shape,
    "pickled": _pickled,
    "compiled": _patch(lambda: torch.compile(tiny_model("llama"))),
    "dtype": _patch(lambda: tiny_model("llama").to(torch.float64)),
    "no_layers": _patch(_no_layers),
    "uncompressed_layer": _patch(lambda: tiny_model("llama"),
                                 {"decode": {"budget": 4, "uncompressed_layers": [3], "scorers": [{"type": "ema"}]}}),
    "cache_implementation": _generate(cache_implementation="quantized"),
    "assisted": _generate(prompt_lookup_num_tokens=2),
    "use_cache": _generate(use_cache=False),
    "foreign_cache": _generate(cache=DynamicCache()),
    "empty": lambda: momentkv.patch(tiny_model("llama")).model.generate(input_ids=torch.zeros((1, 0), dtype=torch.long)),
    "stale": _stale_cache,
    "dynamic_cache_loop": _dynamic_cache_loop,
    "switched_attention": _switched_attention,
    "refused_feature": _patch(lambda: tiny_model("gemma3_text", use_bidirectional_attention=True)),
}


def _templates() -> list[re.Pattern]:
    """The quoted messages of docs/errors.md (fenced blocks), ``{...}`` standing for any filled-in text."""
    text = (ROOT / "docs" / "errors.md").read_text()
    lines = [line for block in re.findall(r"```\n(.*?)```", text, re.S) for line in block.splitlines() if line]
    return [re.compile(r"(generation_config\.)?" + ".+?".join(map(re.escape, re.split(r"\{[^}]*\}", line))))
            for line in lines]


@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_documented_errors_are_produced(case):
    """Each error raises a PolicyError; each of its problems matches a message quoted in the doc."""
    with pytest.raises(PolicyError) as info:
        TRIGGERS[case]()
    templates = _templates()
    for problem in info.value.problems:
        assert any(t.fullmatch(problem) for t in templates), problem
