"""``momentkv tune`` on a tiny model: a seeded Optuna search over a YAML space, confirmed on held-out prompts,
resumable; bad spaces and inputs exit 2 naming the problem."""

from __future__ import annotations

import json
import re

import pytest

from momentkv import models
from momentkv.cli.main import main
from momentkv.policy import load_policy
from momentkv.tune.space import SearchSpaceError, load_space
from tests.models import tiny_model
from tests.test_eval_cli import FakeTokenizer

SPACE = """
decode:
  recent_fraction: {low: 0.0, high: 0.5}
  cadence: [1, 2]
scorers:
  ema:
    use: true
    alpha: {low: 0.5, high: 0.99}
    normalize: [none, rank]
  recency:
    use: [true, false]
    weight: {low: 0.1, high: 2.0, log: true}
    normalize: rank
"""


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"prompt {i} " * (i + 2), "kind": ("free", "grounded")[i % 2],
                                "split": "tune" if i < 4 else "heldout"}) + "\n")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return prompts, space


def _tune(out, files, *extra):
    prompts, space = files
    return main(["tune", "--budget", "4", "--space", str(space), "--prompts", str(prompts), "--proxy-tokens", "8",
                 "--proxy-prompts", "2", "--new-tokens", "10", "--batch-size", "1", "--out", str(out), *extra])


def test_tune_writes_a_valid_winner_with_its_held_out_interval_and_resumes(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    assert _tune(out, files, "--trials", "2") == 0
    assert "2 to run" in capsys.readouterr().err
    best = (out / "best.yaml").read_text()
    policy = load_policy(out / "best.yaml")
    assert policy.name == "tuned" and policy.decode.budget == 4 and policy.decode.cadence in (1, 2)
    assert [s.type for s in policy.decode.scorers][0] == "ema" and 0.5 <= policy.decode.scorers[0].alpha <= 0.99
    assert "# Held-out: 2 prompts x 10 tokens at decode budget 4: KL (active steps)" in best
    assert "# Against recency:" in best and "paired KL ratio - 1" in best
    prompts, space = files
    assert f"# Command: momentkv tune --budget 4 --space {space} --prompts {prompts} --proxy-tokens 8" in best
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["kl_active"]["mean"] > 0 and summary["proxy_kl"] > 0
    assert "## Best trials" in (out / "tune.md").read_text()
    # The same command with more trials continues the study: only the missing ones run, references are reused.
    assert _tune(out, files, "--trials", "3") == 0
    err = capsys.readouterr().err
    assert "2 trials already finished, 1 to run" in err
    assert json.loads((out / "summary.json").read_text())["trials"] == 3


def test_a_trial_is_never_pruned_after_its_last_batch(tmp_path, files, monkeypatch, capsys):
    import optuna

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)  # a pruner that prunes whatever it can
    # Both proxy prompts in one batch: the only report is the complete value, so every trial finishes.
    assert _tune(tmp_path / "one", files, "--trials", "3", "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "pruned" not in err and len(re.findall(r"trial \d+: KL ", err)) == 3
    # One prompt per batch: the trials are pruned after the first, before the last; with no trial run to the end
    # there is no winner, which the command says (exit 2) rather than failing inside Optuna.
    assert _tune(tmp_path / "two", files, "--trials", "2") == 2
    err = capsys.readouterr().err
    assert len(re.findall(r"trial \d+: pruned after 1 prompts", err)) == 2
    assert "no trial ran to the end (2 pruned or invalid)" in err


def test_resuming_with_another_setup_exits_2(tmp_path, files, monkeypatch, capsys):
    from momentkv.tune.study import Setup, open_study

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    out.mkdir()
    _, space = files
    open_study(out, Setup(model_name="smollm2", budget=6, memory="decode", proxy_tokens=8,
                          proxy_prompts=["p0", "p1"], space=space.read_text(), seed=0), seed=0)
    assert _tune(out, files, "--trials", "2") == 2
    err = capsys.readouterr().err
    assert "holds a study of another setup (different budget)" in err


@pytest.mark.parametrize("text, message", [
    ("scorers:\n  nonesuch: {}\n", "scorers.nonesuch: unknown scorer"),
    ("scorers:\n  ema: {alpha: {low: 0.9, high: 0.5}}\n", "scorers.ema.alpha: needs low <= high"),
    ("scorers:\n  ema: {alhpa: 0.5}\n", "scorers.ema.alhpa: not a field of ema"),
    ("decode:\n  recnet: 3\nscorers:\n  ema: {}\n", "decode.recnet: unknown"),
    ("scorers:\n  ema: {weight: {low: 0, high: 1, log: true}}\n", "low > 0 on a log scale"),
    ("scorers:\n  ema: {use: maybe}\n", "scorers.ema.use: true, false"),
    ("decode: {}\n", "needs a 'scorers' mapping"),
])
def test_bad_search_spaces_name_the_problem(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError, match=message):
        load_space(path)


def test_the_default_space_is_valid():
    space = load_space()
    assert {s.type for s in space.scorers} >= {"ema", "recency"}


def test_bad_space_or_numbers_exit_2_before_loading_the_model(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    _, space = files
    space.write_text("scorers:\n  nonesuch: {}\n")
    assert _tune(tmp_path / "out", files, "--trials", "2") == 2
    assert "scorers.nonesuch: unknown scorer" in capsys.readouterr().err
    assert _tune(tmp_path / "out", files, "--trials", "0") == 2
    assert "--trials must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
