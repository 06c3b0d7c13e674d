"""``momentkv demo`` end to end on a tiny random model (the real model is exercised by ``momentkv demo`` itself)."""

from __future__ import annotations

from momentkv import models
from momentkv.cli.main import main
from tests.models import tiny_model
from tests.test_eval_cli import FakeTokenizer


class DecodingTokenizer(FakeTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_demo_compares_full_cache_and_policy(monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), DecodingTokenizer()))
    assert main(["demo", "--new-tokens", "40", "--policy", "recency.yaml"]) == 0
    out = capsys.readouterr().out
    assert "===== full cache =====" in out and "===== recency =====" in out
    assert "tokens/s" in out and "agreement: the first" in out
    # A 128-token budget is never reached in 40 tokens: the outputs are identical.
    assert "the first 40 of 40 tokens are identical; 100% of positions" in out


def test_demo_rejects_bad_policy(capsys):
    assert main(["demo", "--policy", "nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_demo_samples_one_stream_for_both_runs(monkeypatch, capsys):
    """Sampled by default from one seeded stream: the same seed gives the same text; another seed another."""
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), DecodingTokenizer()))

    def text(*extra):
        assert main(["demo", "--new-tokens", "30", "--policy", "recency.yaml", *extra]) == 0
        out = capsys.readouterr().out
        assert "sampled (temperature 0.7, top-p 0.95" in out and "rep-4" in out
        return out.split("===== full cache =====")[1].split("=====")[0]

    first, again, other = text(), text(), text("--seed", "1")
    assert first == again and first != other
    assert main(["demo", "--new-tokens", "30", "--policy", "recency.yaml", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert "decoding: greedy" in greedy and greedy.split("===== full cache =====")[1].split("=====")[0] != first


def test_demo_rejects_bad_temperature(monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), DecodingTokenizer()))
    assert main(["demo", "--temperature", "0"]) == 2
    assert "--temperature must be positive" in capsys.readouterr().err
