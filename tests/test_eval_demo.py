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
