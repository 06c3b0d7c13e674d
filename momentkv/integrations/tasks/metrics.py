"""The metrics of the ``momentkv_long`` tasks (their ``process_results``, named by ``!function`` in their YAML files).

Each scorer takes a document and the model's answer (the text generated after the prompt, cut at the first
blank line) and returns per-document metrics that lm-eval averages, with its standard error of the mean:
one strict metric (the whole answer right) and one graded metric (how far the answer stays right).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^\s*(\d+)\.\s*(-?\d+)\s*$")  # "12. 47"
_WORD = re.compile(r"^\s*(\d+)\.\s*([A-Za-z]+)\s*$")  # "12. kettle"
_TOTAL = re.compile(r"^\s*Total:\s*(\d+)(?:\s+words?)?\s*$")  # "Total: 21 words"
_CODE = re.compile(r"^\s*\d{4}(?:\s+\d{4})*\s*$")


def _answer(results: list[str]) -> str:
    return results[0] if results else ""


def _lines(results: list[str]) -> list[str]:
    """The answer's non-blank lines."""
    return [line for line in _answer(results).split("\n") if line.strip()]


def _numbered(line: str, pattern: re.Pattern) -> tuple | None:
    """``(index, item)`` of a line ``k. item`` (the item an int for numbers), ``None`` if it is not one."""
    m = pattern.match(line)
    if not m:
        return None
    item = m.group(2)
    return int(m.group(1)), int(item) if pattern is _NUMBER else item


def _leading(matches: list[bool]) -> int:
    """How many of ``matches`` are True before the first False."""
    count = 0
    for ok in matches:
        if not ok:
            break
        count += 1
    return count


def score_count(doc: dict, results: list[str]) -> dict:
    """Numbered list ``k. value``: the prompt gives lines 1..``given``, the answer continues to ``lines``.

    ``exact``: every line present and right, nothing else; ``lines_correct``: the fraction of the lines to
    write that are right before the first wrong one.
    """
    expected = [(i + 1, v) for i, v in enumerate(doc["answer"])][doc["given"]:]
    got = [_numbered(line, _NUMBER) for line in _lines(results)]
    right = _leading([g == e for g, e in zip(got, expected)])
    return {"exact": float(right == len(expected) == len(got)), "lines_correct": right / len(expected)}


def score_recall(doc: dict, results: list[str]) -> dict:
    """``Code: C`` (the model's own), a count to ``count_to``, then ``Code again: C``.

    ``exact``: a well-formed code of ``groups`` four-digit groups written again identically;
    ``groups_recalled``: the fraction of the code's groups repeated in place. A malformed code scores 0, and
    so does a code copied from the prompt's examples: the prompt stays in the cache, so repeating such a
    code needs no memory of the answer.
    """
    lines = _answer(results).strip("\n").split("\n")
    code = lines[0].strip() if lines else ""
    again = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.startswith("Code again:")), "")
    groups, repeated = code.split(), again.split()
    if not _CODE.match(code) or len(groups) != doc["groups"] or " ".join(groups) in doc["demo_codes"]:
        return {"exact": 0.0, "groups_recalled": 0.0}
    recalled = sum(a == b for a, b in zip(groups, repeated))
    return {"exact": float(repeated == groups), "groups_recalled": recalled / len(groups)}


def score_tally(doc: dict, results: list[str]) -> dict:
    """The prompt's words numbered ``k. word``, one per line, then ``Total: N words``.

    ``exact``: the last line is ``Total:`` with the number of words; ``words_correct``: the fraction of
    the words numbered and copied right, in order, before the first wrong line.
    """
    words = doc["words"]
    lines = _lines(results)
    got = [_numbered(line, _WORD) for line in lines]
    right = _leading([g == (i + 1, w) for i, (g, w) in enumerate(zip(got, words))])
    total = _TOTAL.match(lines[-1]) if lines else None
    exact = bool(total) and int(total.group(1)) == len(words)
    return {"exact": float(exact), "words_correct": right / len(words)}
