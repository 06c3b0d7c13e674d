"""The decode-time needle test (momentkv/eval/needle.py, ``momentkv needle``) on tiny random models."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json

import pytest

from momentkv import models
from momentkv.cli.main import build_parser, main
from momentkv.eval import needle
from momentkv.eval.configs import build_configs
from momentkv.policy import load_policy
from tests.models import tiny_model


class ByteTokenizer:
    """One token per byte, folded into the tiny models' 128-token vocabulary; no chat template."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [3 + b % 120 for b in text.encode()]}


def _instances(n=3, seed=0):
    return needle.generate_instances(n, seed=seed, sentences=12)


def test_instances_are_reproducible_from_the_seed():
    first, again = needle.generate_instances(6, seed=3), needle.generate_instances(6, seed=3)
    assert first == again
    assert needle.generate_instances(4, seed=3) == first[:4]  # an instance depends on (seed, index) only
    other = needle.generate_instances(6, seed=4)
    assert [i.answer for i in other] != [i.answer for i in first]
    assert {i.kind for i in needle.generate_instances(30, seed=0)} == {"code", "name", "number"}
    for inst in first:  # the fact appears only in the generated part
        assert inst.answer not in inst.filler and inst.answer not in inst.request and inst.answer not in inst.lead


def test_encoding_places_the_fact_exactly_distance_tokens_before_the_question():
    tok = ByteTokenizer()
    inst = _instances(1)[0]
    for distance in (0, 5, 40):
        e = needle.encode_instance(tok, inst, distance)
        question = tok(" " + inst.question)["input_ids"]
        answer = e.generated[e.answer_start:e.answer_end]
        assert answer == tok(" " + inst.answer)["input_ids"]
        assert e.answer_start - len(question) - e.fact_end == distance  # D filler tokens in between
        assert e.generated[e.fact_end - len(answer) - 1:e.fact_end - 1] == answer  # the fact holds the same ids
        assert e.prompt == tok(inst.request)["input_ids"]
    with pytest.raises(needle.NeedleFileError, match="fewer than the distance 100000"):
        needle.encode_instance(tok, inst, 100_000)


def _write(path, *lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_valid_instance_file_loads_with_defaults(tmp_path):
    path = _write(tmp_path / "n.jsonl", {"id": 7, "question": "The vault code is", "answer": "9911"}, "",
                  {"question": "The cat is called", "answer": "Mittens", "filler": "It rained. " * 50,
                   "request": "Tell me about your week.", "kind": "pet"})
    first, second = needle.load_instances(path)
    assert first.id == "7" and first.kind == "custom" and first.end == "." and "9911" not in first.filler
    assert second.id == "line3" and second.kind == "pet" and second.filler.startswith("It rained.")
    assert needle.load_instances(path) == [first, second]  # the default filler is seeded by the id


@pytest.mark.parametrize("lines, message", [
    ([], "no instances"),
    (["{not json"], "n.jsonl:1: not valid JSON"),
    ([{"question": "Q is"}, ], "n.jsonl:1: 'answer' must be a non-empty string"),
    ([{"question": "Q is", "answer": "  "}], "'answer' must be a non-empty string"),
    ([{"question": "Q is", "answer": "x1", "colour": "red"}], "unknown field(s) 'colour'"),
    ([{"question": "Q is", "answer": "42", "filler": "I was 42 once."}], "the answer '42' occurs in 'filler'"),
    ([{"question": "Q is", "answer": "alpha", "request": "say alpha"}], "occurs in 'request'"),
    ([{"id": "a", "question": "Q is", "answer": "1"}, {"id": "a", "question": "R is", "answer": "2"}],
     "n.jsonl:2: id 'a' already used on line 1"),
    (["[1, 2]"], "each line is a JSON object"),
])
def test_instance_file_errors_name_the_line_and_the_problem(tmp_path, lines, message):
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    with pytest.raises(needle.NeedleFileError) as err:
        needle.load_instances(path)
    assert message in str(err.value)


def test_a_missing_instance_file_is_named(tmp_path):
    with pytest.raises(needle.NeedleFileError, match="no such file"):
        needle.load_instances(tmp_path / "absent.jsonl")


def _by(rows, label):
    return {(r["distance"], r["instance"]): r for r in rows if r["policy"] == label}


def test_a_budget_larger_than_the_sequence_recalls_exactly_as_the_full_cache():
    model, tok = tiny_model(), ByteTokenizer()
    instances = _instances(3)
    longest = max(needle.encode_instance(tok, i, 40).answer_end for i in instances)
    configs = build_configs(["recency.yaml", "moment.yaml", "h2o.yaml"], [longest + 1])
    rows = needle.run_needle(model, tok, instances, configs, [10, 40], batch_size=2)
    full = _by(rows, "full")
    assert len(full) == 6 and len(rows) == 24
    for config in configs:
        mine = _by(rows, config.label)
        assert mine.keys() == full.keys()
        for key, row in mine.items():
            assert not row["evicted"]
            assert (row["logprob"], row["exact"], row["first_token"]) == (
                full[key]["logprob"], full[key]["exact"], full[key]["first_token"])


def test_batching_does_not_change_the_scores():
    model, tok = tiny_model(), ByteTokenizer()
    instances, configs = _instances(3), build_configs(["recency.yaml"], [16])
    alone = needle.run_needle(model, tok, instances, configs, [20], batch_size=1)
    together = needle.run_needle(model, tok, instances, configs, [20], batch_size=3)
    for a, b in zip(alone, together):
        assert a["key"] == b["key"] and a["exact"] == b["exact"]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_recency_with_a_budget_below_the_distance_loses_the_fact():
    """With one layer, a cached token's keys depend on that token alone: once recency's window no longer
    holds the fact, the answer's score is the same whatever the fact said. The full cache's is not."""
    model, tok = tiny_model(layers=1), ByteTokenizer()
    instances = _instances(3)
    other = {str(d): str((d + 1) % 10) for d in range(10)}  # another answer of the same length
    swapped = [dataclasses.replace(i, answer="".join(other[c] for c in i.answer) if i.answer.isdigit()
                                   else i.answer[1:] + i.answer[0]) for i in instances]
    # Score the real answer after a fact that said another one: same tokens from the filler on.
    lied = [needle.encode_instance(tok, s, 48) for s in swapped]
    truth = [needle.encode_instance(tok, i, 48) for i in instances]
    for lie, true in zip(lied, truth):
        lie.generated[lie.answer_start:] = true.generated[true.answer_start:]
    policy = build_configs(["recency.yaml"], [24])[0].policy
    full = load_policy("full.yaml")
    for lost, label in ((policy, "recency@24"), (full, "full")):
        a = needle.score_batch(model, lost, truth, 0, label)
        b = needle.score_batch(model, lost, lied, 0, label)
        for x, y in zip(a, b):
            if label == "full":
                assert x["logprob"] != y["logprob"]  # the fact matters (a little: the model is random)
            else:
                assert x["evicted"]
                assert x["logprob"] == y["logprob"]  # the fact is gone: not a bit of it is left
    # Through the runner: recency's window (24 < D = 48) gives other scores than the full cache.
    rows = needle.run_needle(model, tok, instances, build_configs(["recency.yaml"], [24]), [48])
    full_rows, recency_rows = _by(rows, "full"), _by(rows, "recency@24")
    assert all(recency_rows[k]["logprob"] != full_rows[k]["logprob"] for k in full_rows)


def test_summary_has_intervals_and_the_difference_to_the_full_cache():
    rows = []
    for label, budget, lp in (("full", None, -1.0), ("recency@8", 8, -5.0)):
        for i in range(4):
            rows.append({"policy": label, "budget": budget, "distance": 16, "instance": f"i{i}",
                         "logprob": lp - i, "exact": i % 2 == 0, "evicted": label != "full"})
    summary = {s["policy"]: s for s in needle.summarize(rows, seed=0)}
    assert summary["full"]["exact"] == 0.5 and summary["full"]["logprob"] == -2.5
    assert summary["recency@8"]["logprob_vs_full"] == -4.0
    assert summary["recency@8"]["logprob_low"] <= -6.5 <= summary["recency@8"]["logprob_high"]
    table = needle.markdown_summary(list(summary.values()))
    assert "| full | 16 | 4 | 0.50 [" in table and "| recency@8 | 16 | 4 |" in table
    # Paired exact match: the same instances pass under both (0/0 discordant), against the full cache only.
    assert summary["recency@8"]["exact_vs_full_p"] == 1.0 and summary["recency@8"]["exact_vs_recency_p"] is None
    assert summary["full"]["exact_vs_full_p"] is None


def test_summary_tests_exact_match_against_recency_on_the_same_instances():
    rows = []
    for label, passes in (("full", range(10)), ("recency@8", ()), ("h2o@8", range(7))):
        for i in range(10):
            rows.append({"policy": label, "budget": None if label == "full" else 8, "distance": 16,
                         "instance": f"i{i}", "logprob": -1.0, "exact": i in passes, "evicted": True})
    summary = {s["policy"]: s for s in needle.summarize(rows, seed=0)}
    h2o = summary["h2o@8"]
    assert (h2o["exact_vs_recency_only_policy"], h2o["exact_vs_recency_only_other"]) == (7, 0)
    assert h2o["exact_vs_recency_p"] == pytest.approx(2 / 128)
    assert (h2o["exact_vs_full_only_policy"], h2o["exact_vs_full_only_other"]) == (0, 3)
    assert "| h2o@8 | 16 | 10 |" in needle.markdown_summary(list(summary.values()))
    assert "7/0, p=0.016" in needle.markdown_summary(list(summary.values()))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_model(), ByteTokenizer()))


def _needle(out, *extra):
    return main(["needle", "--out", str(out), "--instances", "3", "--distances", "8", "24", "--budgets", "16",
                 "--policies", "recency.yaml", "--batch-size", "2", "--no-progress", *extra])


def _rows(folder):
    with open(folder / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_cli_end_to_end_reproducible_and_resumable(tiny, tmp_path, capsys):
    assert _needle(tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "| full | 8 | 3 |" in out and "| recency@16 | 24 | 3 |" in out
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"rows.jsonl", "results.csv", "results.json", "summary.md", "summary.csv", "recall_B16.png"} <= names
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["rows_computed"] == 12 and len(data["rows"]) == 12 and data["command"].startswith("momentkv needle")
    # The same seed gives the same rows in another folder; another seed gives other instances.
    assert _needle(tmp_path / "b") == 0 and _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert _needle(tmp_path / "c", "--seed", "1") == 0 and _rows(tmp_path / "c") != _rows(tmp_path / "a")
    # A rerun reuses every row; a longer run computes only the new ones.
    assert _needle(tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["rows_computed"] == 0
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert _needle(tmp_path / "a", "--distances", "8", "24", "32") == 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["rows_computed"] == 6 and data["rows_reused"] == 12
    capsys.readouterr()


def test_cli_takes_an_instance_file(tiny, tmp_path, capsys):
    path = _write(tmp_path / "mine.jsonl", {"id": "vault", "question": "The vault code is", "answer": "9911"})
    assert _needle(tmp_path / "out", "--prompts", str(path)) == 0
    assert {r["instance"] for r in _rows(tmp_path / "out")} == {"vault"}
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--distances", "-1"], ">= 0"),
    (["--instances", "0"], "--instances must be positive"),
    (["--budgets", "16", "16"], "twice"),
    (["--policies", "nonexistent.yaml"], "nonexistent"),
])
def test_cli_refuses_bad_input_before_any_work(tiny, tmp_path, capsys, extra, message):
    assert _needle(tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_short_filler_and_a_folder_it_did_not_write(tiny, tmp_path, capsys):
    path = _write(tmp_path / "mine.jsonl", {"question": "The vault code is", "answer": "9911", "filler": "Short."})
    assert _needle(tmp_path / "out", "--prompts", str(path)) == 2
    assert "fewer than the distance 24" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _needle(foreign) == 2
    assert "did not write" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_every_option_is_documented():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sub = commands["needle"]
    assert len(sub.description.strip()) >= 20
    assert [a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()] == []
