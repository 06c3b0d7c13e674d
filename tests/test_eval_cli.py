"""``momentkv eval``: bad input ends with exit code 2 before any output; a good run leaves complete output only."""

from __future__ import annotations

import csv
import json
import shlex

import pytest

from momentkv import models
from momentkv.cli.main import main
from tests.models import tiny_model


class FakeTokenizer:
    """Bytes of the text folded into the tiny model's 128-token vocabulary; no chat template."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [3 + b % 120 for b in text.encode()][:24]}


def _write_prompts(path, n=3):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i} " * (i + 1),
                                "kind": "free" if i % 2 else "grounded", "split": "tune"}) + "\n")
    return path


@pytest.fixture
def prompts(tmp_path):
    return _write_prompts(tmp_path / "prompts.jsonl")


def _eval(out, prompts, *extra):
    return main(["eval", "--out", str(out), "--prompts", str(prompts), "--new-tokens", "8", "--no-progress", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--policies", "nonexistent.yaml"], "not a built-in policy"),
    (["--policies", "recency.yaml", "--budgets", "16", "0"], "positive"),
    (["--policies", "recency.yaml", "--budgets", "-4"], "positive"),
    (["--new-tokens", "0"], "positive"),
    (["--total-budgets", "0"], "total budgets must be positive"),
    (["--temperature", "0.5"], "add --reference sample"),
    (["--reference", "sample", "--temperature", "0"], "--temperature must be positive"),
    (["--reference", "sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
])
def test_bad_arguments_exit_2_without_output(tmp_path, prompts, capsys, extra, message, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    out = tmp_path / "out"
    assert _eval(out, prompts, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.parametrize("content, message", [("", "no prompts"), ("\n\n", "no prompts"),
                                              ('{"id": "a"}\n', "'prompt'"), ("not json\n", "not valid JSON")])
def test_bad_prompt_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    assert _eval(out, path) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_prompt_file_exits_2(tmp_path, capsys):
    assert _eval(tmp_path / "out", tmp_path / "nope.jsonl") == 2
    assert "no such prompt file" in capsys.readouterr().err


def test_unloadable_model_exits_2(tmp_path, prompts, capsys):
    out = tmp_path / "out"
    assert _eval(out, prompts, "--model", str(tmp_path / "no-such-model")) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_complete_run_writes_every_output(tmp_path, prompts, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    code = _eval(out, prompts, "--policies", "recency.yaml", "moment.yaml", "--budgets", "4", "64", "--seed", "1")
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".momentkv-output.json", "kl_vs_budget.png", "kl_vs_step_B4.png", "kl_vs_step_B64.png",
                     "prompts.csv", "raw.pt", "results.csv", "results.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prompts.jsonl"]  # no temporary folder left
    rows = list(csv.DictReader(open(out / "results.csv")))
    kl = {(r["label"], r["kind"], r["steps"]): float(r["mean"]) for r in rows if r["metric"] == "kl"}
    assert kl[("full", "all", "all")] == 0.0
    assert kl[("recency@64", "all", "all")] == 0.0  # 8 tokens never fill a 64-token budget
    assert kl[("recency@4", "all", "active")] > 0.0
    assert "--budgets 4 64" in (out / "results.md").read_text()


def test_failed_run_leaves_no_partial_output(tmp_path, prompts, monkeypatch):
    from momentkv.eval import report

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_kl_vs_budget", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _eval(out, prompts, "--policies", "recency.yaml", "--budgets", "4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_sampled_reference_with_total_budgets_and_a_store(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    store = tmp_path / "store"
    args = ["--policies", "recency.yaml", "recency-all.yaml", "--total-budgets", "30", "--reference", "sample",
            "--temperature", "0.9", "--top-p", "0.9", "--store", str(store)]
    assert _eval(tmp_path / "a", prompts, *args) == 0
    err = capsys.readouterr().err
    assert "every prompt runs alone" in err and "recency@T30: KV slots per layer" in err
    text = (tmp_path / "a" / "results.md").read_text()
    assert "reference sampled (temperature 0.9, top-p 0.9, seed 0)" in text
    assert "--reference sample --temperature 0.9 --top-p 0.9" in text and "| recency | T 30 |" in text
    rows = list(csv.DictReader(open(tmp_path / "a" / "prompts.csv")))
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2"] and all(0 <= float(r["reference_rep4"]) <= 1 for r in rows)
    (folder,) = store.iterdir()
    assert sorted(p.name for p in (folder / "passes").iterdir()) == ["full.pt", "recency-all@T30.pt", "recency@T30.pt"]
    # A rerun loads the reference and every pass instead of computing them: same numbers.
    assert _eval(tmp_path / "b", prompts, *args) == 0
    assert capsys.readouterr().err.count("loaded from the store") == 3
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_whole_cache_policies_at_a_total_budget_run_each_prompt_alone(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    store = tmp_path / "store"
    args = ["--policies", "recency-all.yaml", "--total-budgets", "30", "--store", str(store)]
    assert _eval(tmp_path / "a", prompts, *args) == 0
    assert "every prompt runs alone" in capsys.readouterr().err
    (folder,) = store.iterdir()
    assert '"batch_size": 1' in (folder / "reference.json").read_text()


def test_no_full_replay_skips_only_the_full_cache(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    store = tmp_path / "store"
    args = ["--policies", "recency.yaml", "moment.yaml", "--budgets", "4", "--store", str(store)]
    assert _eval(tmp_path / "a", prompts, *args, "--no-full-replay", "--baseline", "moment") == 0
    typed = shlex.join(["momentkv", "eval", "--out", str(tmp_path / "a"), "--prompts", str(prompts), "--new-tokens", "8",
                        "--no-progress", *args, "--no-full-replay", "--baseline", "moment"])
    (folder,) = store.iterdir()
    # The reference is still made (the passes are read against it); only the full cache's own replay is skipped.
    assert (folder / "reference.json").is_file()
    assert sorted(p.name for p in (folder / "passes").iterdir()) == ["moment@4.pt", "recency@4.pt"]
    labels = {r["label"] for r in csv.DictReader(open(tmp_path / "a" / "results.csv"))}
    assert labels == {"recency@4", "moment@4"}
    text = (tmp_path / "a" / "results.md").read_text()
    assert f"    {typed}\n" in text  # the printed command is the one typed, so it reruns this run


def test_a_total_budget_that_a_prompt_fills_exits_2(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    assert _eval(out, prompts, "--policies", "recency.yaml", "--total-budgets", "10") == 2
    assert "total budget 10 leaves no room" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- the output folder
def _no_model(monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))


def test_a_folder_holding_other_files_is_refused_before_any_work_and_kept(tmp_path, prompts, monkeypatch, capsys):
    _no_model(monkeypatch)
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')\n")
    (out / "notes.md").write_text("my notes\n")
    assert _eval(out, prompts, "--policies", "recency.yaml", "--budgets", "4") == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds files that momentkv eval did not write (notes.md, src)" in err
    assert "choose a new or empty folder" in err
    assert (out / "src" / "main.py").read_text() == "print('mine')\n" and (out / "notes.md").read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "src"]


@pytest.mark.parametrize("under, message", [(False, "is a file, not a folder"), (True, "is a file; choose another")])
def test_an_out_path_that_cannot_be_a_folder_exits_2_before_any_work(tmp_path, prompts, monkeypatch, capsys, under,
                                                                     message):
    _no_model(monkeypatch)
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert _eval(blocker / "sub" if under else blocker, prompts) == 2
    assert message in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_a_store_that_is_a_file_exits_2_before_any_work(tmp_path, prompts, monkeypatch, capsys):
    _no_model(monkeypatch)
    store = tmp_path / "store"
    store.write_text("x")
    assert _eval(tmp_path / "out", prompts, "--store", str(store)) == 2
    assert f"--store {store} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_dot_writes_into_an_empty_working_folder_and_refuses_a_full_one(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _eval(".", prompts, "--policies", "recency.yaml", "--budgets", "4") == 0
    assert {"results.md", "results.csv", "raw.pt"} <= {p.name for p in here.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left beside
    # The working folder holding the prompt file is not an output folder: refused before the model loads.
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert _eval(".", prompts, "--policies", "recency.yaml", "--budgets", "4") == 2
    assert "already holds files that momentkv eval did not write" in capsys.readouterr().err


def test_tilde_is_the_home_folder(tmp_path, prompts, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert _eval("~/results", prompts, "--policies", "recency.yaml", "--budgets", "4") == 0
    assert (tmp_path / "home" / "results" / "results.md").is_file()


def test_a_rerun_replaces_its_own_files_only(tmp_path, prompts, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    assert _eval(out, prompts, "--policies", "recency.yaml", "--budgets", "4", "64") == 0
    (out / "notes.md").write_text("kept\n")  # the user's file, added after the first run
    first = (out / "results.md").read_text()
    assert _eval(out, prompts, "--policies", "recency.yaml", "--budgets", "4", "--seed", "3") == 0
    names = {p.name for p in out.iterdir()}
    assert "kl_vs_step_B64.png" not in names  # the first run's file that the second does not write
    assert (out / "notes.md").read_text() == "kept\n" and "kl_vs_step_B4.png" in names
    assert (out / "results.md").read_text() != first and "--seed 3" in (out / "results.md").read_text()


def test_a_folder_written_before_manifests_counts_as_a_previous_run(tmp_path, prompts, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.md", "results.csv", "kl_vs_step_B32.png"):
        (out / name).write_text("old")
    assert _eval(out, prompts, "--policies", "recency.yaml", "--budgets", "4") == 0
    assert "kl_vs_step_B32.png" not in {p.name for p in out.iterdir()}
    assert (out / "results.md").read_text() != "old"


def test_report_checks_its_out_folder_before_reading_the_store(tmp_path, prompts, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    store = tmp_path / "store"
    assert _eval(tmp_path / "a", prompts, "--policies", "recency.yaml", "--budgets", "4", "--store", str(store)) == 0
    (reference,) = store.iterdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my own results")  # a name the report writes, in a folder it did not write
    (mine / "draft.txt").write_text("draft")
    assert main(["report", str(reference), "--out", str(mine)]) == 2
    assert "already holds files that momentkv report did not write" in capsys.readouterr().err
    assert (mine / "results.md").read_text() == "my own results"
    assert main(["report", str(reference), "--out", str(tmp_path / "b")]) == 0
    assert main(["report", str(reference), "--out", str(tmp_path / "b"), "--seed", "2"]) == 0  # its own folder
    assert "--seed 2" in (tmp_path / "b" / "results.md").read_text()


def test_plots_where_no_policy_evicted_draw_no_empty_legend(tmp_path, prompts, monkeypatch):
    import warnings

    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), FakeTokenizer()))
    out = tmp_path / "out"
    with warnings.catch_warnings():  # matplotlib's warning for a legend() with nothing labelled, as an error
        warnings.filterwarnings("error", message="No artists with labels")
        # 8 tokens never fill a budget of 64: no curve, no point, on either plot; one of 4 evicts.
        assert _eval(out, prompts, "--policies", "recency.yaml", "moment.yaml", "--budgets", "4", "64") == 0
    assert (out / "kl_vs_step_B64.png").is_file() and (out / "kl_vs_budget.png").is_file()


def test_the_output_helper_resolves_paths_and_keeps_what_it_did_not_write(tmp_path, monkeypatch):
    from momentkv.cli.outputs import EVAL, MANIFEST, REPORT, OutputPathError, check_output_folder, publish

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert check_output_folder("a/../b", EVAL) == tmp_path / "b"  # absent, under a writable folder
    with pytest.raises(OutputPathError, match="filesystem root"):
        check_output_folder("/", EVAL)
    with pytest.raises(OutputPathError, match="empty"):
        check_output_folder("  ", EVAL)
    with pytest.raises(OutputPathError, match=r"--out \.\. \(.*\) already holds files"):
        check_output_folder("..", EVAL)

    def files(**named):
        return lambda folder: [(folder / name).write_text(text) for name, text in named.items()]

    out = tmp_path / "out"
    assert publish(out, EVAL, files(**{"results.md": "1", "results.csv": "1"})) == ["results.csv", "results.md"]
    assert json.loads((out / MANIFEST).read_text())["files"] == ["results.csv", "results.md"]
    with pytest.raises(OutputPathError, match="momentkv report did not write"):
        check_output_folder(out, REPORT)  # another command's folder
    # A failing write leaves the folder as it was.
    with pytest.raises(ZeroDivisionError):
        publish(out, EVAL, lambda folder: (files(**{"results.md": "2"})(folder), 1 / 0))
    assert (out / "results.md").read_text() == "1" and sorted(p.name for p in out.iterdir()) == \
        [MANIFEST, "results.csv", "results.md"]
    # A file the user put there under a name this run writes is never replaced.
    (out / "raw.pt").write_text("the user's")
    with pytest.raises(OutputPathError, match="now holds raw.pt, not written by momentkv eval"):
        publish(out, EVAL, files(**{"results.md": "3", "raw.pt": "ours"}))
    assert (out / "raw.pt").read_text() == "the user's" and (out / "results.md").read_text() == "1"
    assert not [p for p in out.iterdir() if "partial" in p.name]
