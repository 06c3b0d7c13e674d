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
    # Equal peak memory: a cadence c evicts down to 4 - (c - 1), so every trial holds at most 4 tokens.
    assert policy.name == "tuned" and policy.decode.cadence in (1, 2)
    assert policy.decode.budget + policy.decode.cadence - 1 == 4
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


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_policies_are_compared_at_equal_peak_memory_and_the_winner_evicts(tmp_path, files, monkeypatch, capsys):
    from momentkv.tune.study import STUDY_NAME

    import optuna

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    prompts, space = files
    # Evicting every 4 steps at a decode budget of 8 would hold up to 11 tokens and, in 10, never evict.
    space.write_text(SPACE.replace("cadence: [1, 2]", "cadence: 4"))
    out = tmp_path / "out"
    assert main(["tune", "--budget", "8", "--space", str(space), "--prompts", str(prompts), "--proxy-tokens", "10",
                 "--proxy-prompts", "2", "--new-tokens", "10", "--batch-size", "1", "--trials", "2",
                 "--out", str(out)]) == 0
    policy = load_policy(out / "best.yaml")
    assert policy.decode.cadence == 4 and policy.decode.budget == 5  # 8 - (4 - 1): at most 8 tokens held
    best = (out / "best.yaml").read_text()
    assert "nan" not in best.lower() and "every policy holds at most 8 tokens" in best
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["kl_active"]["mean"] > 0 and summary["kl_active"]["n"] == 2
    assert summary["decode_budget"] == 5 and summary["cadence"] == 4
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert trial.value > 0 and trial.user_attrs["policy"]["decode"]["budget"] == 5


def test_a_trial_that_never_evicted_is_no_result(tmp_path, files, monkeypatch, capsys):
    from momentkv.tune import study as tuning

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    real = tuning.teacher_forced

    def idle(*args, **kwargs):  # the same replay, as if no eviction had happened
        metrics = real(*args, **kwargs)
        metrics.active_from[:] = metrics.kl.shape[1]
        return metrics

    monkeypatch.setattr(tuning, "teacher_forced", idle)
    assert _tune(tmp_path / "out", files, "--trials", "2", "--batch-size", "2") == 2
    err = capsys.readouterr().err
    assert len(re.findall(r"trial \d+: pruned, never evicted in 8 tokens on the 2 proxy prompts", err)) == 2
    assert "no trial ran to the end (2 pruned or invalid; 2 never evicted in 8 tokens: raise --proxy-tokens)" in err
    assert not (tmp_path / "out" / "best.yaml").exists()


@pytest.mark.parametrize("flag", ["--proxy-tokens", "--new-tokens"])
def test_lengths_at_which_nothing_is_evicted_exit_2_before_loading_the_model(tmp_path, files, monkeypatch, capsys,
                                                                             flag):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert _tune(tmp_path / "out", files, "--trials", "2", flag, "5") == 2
    assert f"{flag} 5 never fills a decode budget of 4: no policy would evict; use at least 6" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_total_budget_no_prompt_fills_exits_2_before_the_search(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    prompts, space = files
    assert main(["tune", "--total-budget", "100", "--space", str(space), "--prompts", str(prompts),
                 "--proxy-tokens", "8", "--proxy-prompts", "2", "--new-tokens", "10", "--out", str(tmp_path / "out"),
                 "--trials", "2"]) == 2
    assert "no tune prompt fills the total budget 100 with --proxy-tokens 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_estimates_without_a_value_are_null_in_the_summary_and_said_so_in_best_yaml():
    from momentkv.cli.tune_cmd import _fmt
    from momentkv.tune.study import summary_json

    nan = float("nan")
    empty = {"mean": nan, "low": nan, "high": nan, "n": 0}
    text = summary_json({"kl_active": empty, "versus": {"recency": {"relative": empty}}, "proxy_kl": 0.5})
    assert _strict_json(text) == {"kl_active": {"mean": None, "low": None, "high": None, "n": 0},
                                  "versus": {"recency": {"relative": {"mean": None, "low": None, "high": None,
                                                                      "n": 0}}}, "proxy_kl": 0.5}
    assert "nan" not in _fmt(empty).lower() and "nan" not in _fmt(empty, percent=True).lower()
    assert _fmt({"mean": 0.01, "low": -0.02, "high": 0.05}, percent=True) == "+1.0% [-2.0, +5.0]"


def test_tune_refuses_a_folder_holding_other_files_before_loading_the_model(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "paper.tex").write_text("mine")
    assert _tune(out, files, "--trials", "2") == 2
    assert "already holds files that momentkv tune did not write (paper.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["paper.tex"]
