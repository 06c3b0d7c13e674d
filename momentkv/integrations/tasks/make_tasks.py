"""Write the JSONL files of the momentkv_long task group (run: ``python -m momentkv.integrations.tasks.make_tasks``).

Every document is a plain-text prompt (worked examples, then the start of one more) whose answer runs to a
few hundred tokens and can be checked exactly. The formats suit a small model (SmolLM2-135M follows them
with the full cache), and each stresses eviction differently:

- ``count``: continue a numbered list from a rule (a start and a step, its first three lines given): each
  line needs the one before it, so the newest tokens must stay;
- ``recall``: invent a code, count to 60, then write the code again: the code exists only in the model's own
  earlier output, so a cache that dropped it cannot repeat it;
- ``recall_far``: the same with a code of one four-digit group and a count to 80, so the code lies about 240
  tokens back when it is due (past 200), in a form the model copies reliably with the full cache;
- ``tally``: number the words of a list one per line, then count them on a final ``Total:`` line: each line
  copies the next word from the prompt, found by the word the model wrote last.

The files are generated once with a fixed seed and shipped; this script documents and reproduces them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS_PER_TASK = 40
COUNT_LINES, COUNT_GIVEN = 30, 3
COUNT_STEPS = (1, 2, 5, 10)  # steps a 135M model can keep; +3 or +7 drift within a few lines
RECALL_GROUPS, RECALL_COUNT_TO, RECALL_DEMOS = 4, 60, 3
RECALL_FAR_GROUPS, RECALL_FAR_COUNT_TO = 1, 80
TALLY_WORDS = (18, 26)
WORDS = (
    "apple anchor badge basket bell bicycle blanket bottle bridge brush bucket button cabin camera candle "
    "canoe carpet castle chair cherry chimney clock cloud coat comb compass cookie copper cotton crayon "
    "desert diamond dragon drum eagle engine feather fence fiddle flag flute forest fountain garden garlic "
    "giraffe glove goat guitar hammer harbor helmet honey island jacket jelly kettle kite ladder lamp lemon "
    "lion lizard magnet mango marble meadow mirror monkey needle nest oak ocean olive onion orange owl "
    "paddle panda parrot peach pencil pepper piano pillow pine planet pocket pony pumpkin puzzle quilt "
    "rabbit radio raven ribbon river robot rocket saddle salmon sandal scarf shell shovel silver sled "
    "spoon squirrel stamp star stone sugar sweater table teapot tiger tomato towel tractor tulip tunnel "
    "turtle umbrella valley violin wagon walnut whale whistle window wolf yarn zebra"
).split()


def _count_block(start: int, step: int, lines: int) -> str:
    return "\n".join(f"{i + 1}. {start + i * step}" for i in range(lines))


def count_doc(rng: random.Random) -> dict:
    def rule() -> tuple[int, int]:
        return rng.randint(1, 60), rng.choice(COUNT_STEPS)

    demos = []
    for _ in range(2):
        start, step = rule()
        demos.append(f"Count up by {step} from {start}, {COUNT_LINES} lines:\n{_count_block(start, step, COUNT_LINES)}")
    start, step = rule()
    block = _count_block(start, step, COUNT_LINES).split("\n")
    given = "\n".join(block[:COUNT_GIVEN])
    prompt = "\n\n".join(demos) + f"\n\nCount up by {step} from {start}, {COUNT_LINES} lines:\n{given}\n"
    return {"prompt": prompt, "target": "\n".join(block[COUNT_GIVEN:]), "start": start, "step": step,
            "lines": COUNT_LINES, "given": COUNT_GIVEN, "answer": [start + i * step for i in range(COUNT_LINES)]}


def _code(rng: random.Random, groups: int) -> str:
    return " ".join(f"{rng.randint(1000, 9999)}" for _ in range(groups))


def recall_doc(rng: random.Random, groups: int = RECALL_GROUPS, count_to: int = RECALL_COUNT_TO) -> dict:
    count = " ".join(str(i) for i in range(1, count_to + 1))
    codes = [_code(rng, groups) for _ in range(RECALL_DEMOS)]
    demos = [f"Code: {code}\nCount: {count}\nCode again: {code}" for code in codes]
    # The next code is chosen by the model: only its own output holds it when "Code again:" is due.
    prompt = "\n\n".join(demos) + "\n\nCode:"
    target = f"(a code of {groups} four-digit groups)\nCount: {count}\nCode again: (the same code)"
    return {"prompt": prompt, "target": target, "groups": groups, "count_to": count_to, "demo_codes": codes}


def recall_far_doc(rng: random.Random) -> dict:
    return recall_doc(rng, RECALL_FAR_GROUPS, RECALL_FAR_COUNT_TO)


def _tally_block(words: list[str]) -> str:
    return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + f"\nTotal: {len(words)} words"


def tally_doc(rng: random.Random) -> dict:
    def draw() -> list[str]:
        return rng.sample(WORDS, rng.randint(*TALLY_WORDS))

    demos = []
    for _ in range(2):
        words = draw()
        demos.append(f"Words: {', '.join(words)}\n{_tally_block(words)}")
    words = draw()
    prompt = "\n\n".join(demos) + f"\n\nWords: {', '.join(words)}\n"
    return {"prompt": prompt, "target": _tally_block(words), "words": words}


MAKERS = {"count": count_doc, "recall": recall_doc, "tally": tally_doc, "recall_far": recall_far_doc}


def main() -> None:
    for seed, (name, maker) in enumerate(MAKERS.items()):
        rng = random.Random(1000 + seed)
        docs = [{"id": f"{name}-{i:02d}", **maker(rng)} for i in range(DOCS_PER_TASK)]
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        print(f"wrote {len(docs)} documents to {path}")


if __name__ == "__main__":
    main()
