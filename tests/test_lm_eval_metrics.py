"""The scorers of the ``momentkv_long`` tasks: exact answers score 1, and each kind of mistake is caught."""

from __future__ import annotations

import json

from momentkv.integrations.tasks import TASKS_DIR
from momentkv.integrations.tasks.metrics import score_count, score_recall, score_tally


def _first(name: str) -> dict:
    with open(TASKS_DIR / f"{name}.jsonl") as f:
        return json.loads(f.readline())


def test_count_exact_answer_and_its_mistakes():
    doc = _first("count")
    lines = doc["target"].split("\n")
    assert len(lines) == 27 and lines[0].startswith("4. ")  # lines 1-3 are in the prompt
    assert score_count(doc, [doc["target"]]) == {"exact": 1.0, "lines_correct": 1.0}
    wrong = lines.copy()
    wrong[9] = wrong[9].split(". ")[0] + ". 1"  # line 13 wrong: lines 4..12 count
    assert score_count(doc, ["\n".join(wrong)]) == {"exact": 0.0, "lines_correct": 9 / 27}
    assert score_count(doc, ["\n".join(lines[:-1])]) == {"exact": 0.0, "lines_correct": 26 / 27}
    assert score_count(doc, [doc["target"] + "\n31. 0"])["exact"] == 0.0  # one line too many
    assert score_count(doc, ["\n".join(lines[1:])]) == {"exact": 0.0, "lines_correct": 0.0}  # a line skipped
    assert score_count(doc, [""]) == {"exact": 0.0, "lines_correct": 0.0}


def test_recall_needs_the_models_own_code_repeated():
    doc = _first("recall")
    count = " ".join(str(i) for i in range(1, 61))
    good = f" 1234 5678 9012 3456\nCount: {count}\nCode again: 1234 5678 9012 3456"
    assert score_recall(doc, [good]) == {"exact": 1.0, "groups_recalled": 1.0}
    half = good.replace("again: 1234 5678 9012 3456", "again: 1234 5678 0000 1111")
    assert score_recall(doc, [half]) == {"exact": 0.0, "groups_recalled": 0.5}
    assert score_recall(doc, [good.replace("Code again", "Code")]) == {"exact": 0.0, "groups_recalled": 0.0}
    malformed = good.replace(" 1234 5678 9012 3456\n", " 12 5678\n", 1)
    assert score_recall(doc, [malformed]) == {"exact": 0.0, "groups_recalled": 0.0}
    copied = good.replace("1234 5678 9012 3456", doc["demo_codes"][-1])  # the prompt holds it: no recall
    assert score_recall(doc, [copied]) == {"exact": 0.0, "groups_recalled": 0.0}


def test_tally_checks_the_words_and_the_total_line():
    doc = _first("tally")
    n = len(doc["words"])
    assert score_tally(doc, [doc["target"]]) == {"exact": 1.0, "words_correct": 1.0}
    lines = doc["target"].split("\n")
    swapped = lines.copy()
    swapped[2], swapped[3] = f"3. {doc['words'][3]}", f"4. {doc['words'][2]}"  # two words out of order
    assert score_tally(doc, ["\n".join(swapped)]) == {"exact": 1.0, "words_correct": 2 / n}
    bad_total = lines[:-1] + [f"Total: {n + 1} words"]
    assert score_tally(doc, ["\n".join(bad_total)]) == {"exact": 0.0, "words_correct": 1.0}
    assert score_tally(doc, ["\n".join(lines[:-1])])["exact"] == 0.0  # no Total line
    assert score_tally(doc, ["\n".join(lines[:-1] + [f"Total: {n}"])])["exact"] == 1.0  # "words" optional


def test_targets_agree_with_the_rules():
    count, tally = _first("count"), _first("tally")
    assert [int(line.split(". ")[1]) for line in count["target"].split("\n")] == count["answer"][3:]
    assert count["answer"] == [count["start"] + i * count["step"] for i in range(count["lines"])]
    assert tally["target"].endswith(f"Total: {len(tally['words'])} words")
    assert f"Words: {', '.join(tally['words'])}\n" in tally["prompt"]
    assert len(set(tally["words"])) == len(tally["words"])  # distinct words: the next one is unambiguous


def test_recall_far_asks_for_one_group_about_240_tokens_back():
    doc = _first("recall_far")
    assert doc["groups"] == 1 and doc["count_to"] == 80
    count = " ".join(str(i) for i in range(1, 81))
    good = f" 4821\nCount: {count}\nCode again: 4821"
    assert score_recall(doc, [good]) == {"exact": 1.0, "groups_recalled": 1.0}
    assert score_recall(doc, [good.replace("again: 4821", "again: 4812")]) == {"exact": 0.0, "groups_recalled": 0.0}
    assert score_recall(doc, [good.replace(" 4821\n", " 4821 1111\n", 1)])["exact"] == 0.0  # two groups
    copied = good.replace("4821", doc["demo_codes"][0])
    assert score_recall(doc, [copied])["exact"] == 0.0
    # The count between the code and its repetition is the distance: 80 numbers.
    assert doc["prompt"].count(f"Count: {count}\nCode again:") == 3
    assert all(len(code) == 4 and code.isdigit() for code in doc["demo_codes"])
