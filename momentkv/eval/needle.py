"""A decode-time needle test: can the model still copy a fact it generated D tokens ago?

Each instance is one teacher-forced assistant turn. The user's request asks for some writing; the assistant's
text (fed one token at a time, as generation, so a policy evicts along the way) states a fact, continues
with exactly ``D`` tokens of filler, then restarts the fact's own sentence (the *question*, e.g. "The access
code is") and is scored on the fact's tokens that follow (the *answer*, e.g. " 4831")::

    chat prompt(request) | lead + question + answer + end | filler[:D] | question | answer
                           ^ the fact, generated              ^ D tokens   ^ scored

``D`` is the number of filler tokens between the fact's last token and the question's first. The fact never
appears in the prompt, so only the cache of generated tokens can hold it. The answer's tokens are the same
ids in the fact and at the end (each piece is encoded on its own and the ids concatenated), so recalling it
is copying tokens.

Scores per instance: the answer's log-probability (sum over its tokens, each given the true prefix) and exact
match, greedy over the answer span (every answer token is the argmax given the true prefix).

Instances come from a seed (:func:`generate_instances`: three kinds of fact, a four-digit access code, a
surname and a five-digit order number, and filler sentences built from word lists, none of which can
contain the answer) or from a JSONL file (:func:`load_instances`). Every pass uses :func:`momentkv.eval.stepping.run_steps`, the loop every
evaluation shares; the full cache runs through the same loop (``full.yaml``), so a policy whose budget is
never reached gives the full cache's numbers exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import momentkv
from momentkv.errors import PolicyError
from momentkv.eval.configs import EvalConfig
from momentkv.eval.jsonl import json_lines
from momentkv.eval.memory import check_stored
from momentkv.eval.stepping import left_pad, run_steps
from momentkv.policy import load_policy

FULL_LABEL = "full"


class NeedleFileError(PolicyError):
    """A needle instance file that is missing, empty or malformed."""


@dataclass(frozen=True)
class NeedleInstance:
    """One (fact, filler, question) instance; the fact is ``question + " " + answer + end``."""

    id: str
    kind: str  # "code", "name", "number", or what a user's file says
    request: str  # the user's turn
    lead: str  # the assistant's opening, before the fact
    question: str  # the fact's sentence up to the answer, e.g. "The access code is"
    answer: str  # e.g. "4831"
    end: str  # what closes the fact's sentence, e.g. "."
    filler: str  # text between the fact and the question (its first D tokens are used)


@dataclass(frozen=True)
class EncodedInstance:
    """Token ids of one instance at one distance: the prompt and the teacher-forced generated part."""

    instance: NeedleInstance
    distance: int
    prompt: list[int]
    generated: list[int]
    answer_start: int  # index in ``generated`` of the answer's first token
    answer_end: int  # one past its last token
    fact_end: int  # one past the fact's last token (the filler starts here)

    def fingerprint(self) -> str:
        data = json.dumps([self.prompt, self.generated, self.answer_start], separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]


# ---- instances from a seed -------------------------------------------------------------------------------

REQUESTS = (
    "Write a long diary entry about an ordinary day at work. Keep going until I ask you to stop.",
    "Write a long, detailed account of a quiet day in a small town.",
    "Write a long story about an ordinary afternoon. Take your time and add many details.",
    "Describe a long day at a busy office in as much detail as you can.",
)
LEADS = (
    "Here is my account of the day.",
    "Sure, here it is.",
    "Of course. Here is the text.",
    "It was an ordinary day.",
)
LAST_NAMES = ("Quinlan", "Fairbanks", "Okonkwo", "Lindqvist", "Harrowgate", "Delacroix", "Pemberton", "Vasquez",
              "Thornbury", "Abernathy", "Kowalski", "Whitcombe", "Nakamura", "Ashdown", "Bellweather", "Castellan")
# Filler words: no digits and none of the surnames above, so the filler never holds an answer.
SUBJECTS = ("The clerk", "A neighbour", "The old dog", "My manager", "The baker", "A tired student", "The gardener",
            "Someone upstairs", "The new intern", "A delivery driver", "The librarian", "My cousin")
VERBS = ("carried", "painted", "forgot", "noticed", "cleaned", "moved", "opened", "repaired", "counted", "checked",
         "found", "folded")
OBJECTS = ("the blue chair", "a stack of letters", "the kitchen window", "an empty basket", "the heavy boxes",
           "a pair of boots", "the garden gate", "a loaf of bread", "the dusty shelves", "a small umbrella",
           "the long table", "a bundle of keys")
PLACES = ("near the station", "before lunch", "in the hallway", "after the rain", "behind the bakery",
          "on the second floor", "by the river", "during the meeting", "at the market", "next to the fountain",
          "in the afternoon", "under the old bridge")
TAILS = ("", "", " and then went home", " without a word", " twice", " very slowly", " with great care",
         " while humming a tune")


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}{rng.choice(TAILS)}."


def _fact(rng: random.Random) -> tuple[str, str, str]:
    # Forms SmolLM2-135M-Instruct copies back with the full cache at every distance from 32 tokens on: a
    # courier's full name ("The courier's name is Martha Quinlan") and a three-digit room number are copied
    # only about half the time at 32 tokens, so the name is a surname and the number has five digits.
    kind = rng.choice(("code", "name", "number"))
    if kind == "code":
        return kind, "The access code is", str(rng.randint(1000, 9999))
    if kind == "name":
        return kind, "The courier's surname is", rng.choice(LAST_NAMES)
    return kind, "The order number is", str(rng.randint(10000, 99999))


def generate_instances(n: int, seed: int = 0, sentences: int = 160) -> list[NeedleInstance]:
    """``n`` instances, each a function of ``(seed, its index)`` only: the first ``k`` of ``n`` are the
    instances of a run with ``k``. ``sentences`` filler sentences each (about 11 tokens per sentence)."""
    if n < 1:
        raise ValueError(f"the number of instances must be positive, got {n}")
    out = []
    for index in range(n):
        rng = random.Random(f"momentkv-needle:{seed}:{index}")
        kind, question, answer = _fact(rng)
        request, lead = rng.choice(REQUESTS), rng.choice(LEADS)
        filler = " ".join(filler_sentence(rng) for _ in range(sentences))
        out.append(NeedleInstance(id=f"s{seed}-{index}", kind=kind, request=request, lead=lead, question=question,
                                  answer=answer, end=".", filler=filler))
    return out


# ---- instances from a file -------------------------------------------------------------------------------

REQUIRED = ("question", "answer")
OPTIONAL = {"id": None, "kind": "custom", "request": REQUESTS[0], "lead": LEADS[0], "end": ".", "filler": None}


def _instance(data, where: str, line_no: int) -> NeedleInstance:
    if not isinstance(data, dict):
        raise NeedleFileError(f"{where}: each line is a JSON object with the fields {', '.join(REQUIRED)}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise NeedleFileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                              f"{', '.join(REQUIRED + tuple(OPTIONAL))}")
    values = {}
    for field in REQUIRED + tuple(OPTIONAL):
        value = data.get(field, OPTIONAL.get(field))
        if field == "id" and value is None:
            value = f"line{line_no}"
        if field == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if field == "filler" and value is None:  # sentences from the word lists, seeded by the id
            rng = random.Random(f"momentkv-needle-filler:{values['id']}")
            value = " ".join(filler_sentence(rng) for _ in range(160))
        if not isinstance(value, str) or (field != "end" and not value.strip()):
            raise NeedleFileError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
        values[field] = value.strip() if field in ("question", "answer") else value
    answer = values["answer"]
    for field in ("request", "lead", "filler", "question"):
        if answer in values[field]:
            raise NeedleFileError(f"{where}: the answer {answer!r} occurs in {field!r}; it must appear only in the "
                                  "fact, or the test would not measure recall of the fact")
    return NeedleInstance(**values)


def load_instances(path) -> list[NeedleInstance]:
    """Read instances from a JSONL file, one object per line (blank lines allowed).

    Fields: ``question`` (the fact's sentence up to the answer, e.g. "The access code is") and ``answer``
    ("4831") are required; ``id``, ``kind``, ``request`` (the user's turn), ``lead`` (the assistant's text
    before the fact), ``end`` (what closes the fact's sentence, default ".") and ``filler`` (text at least as
    many tokens long as the largest distance; default: sentences from the word lists, seeded by the id) are
    optional. Raises :class:`NeedleFileError`
    naming the file and line for a missing file, bad JSON, a missing or empty field, an unknown field, an
    answer that occurs outside the fact, duplicate ids, or a file without instances.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NeedleFileError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise NeedleFileError(f"{source}: cannot read it ({err})") from None
    out, seen = [], {}
    for line_no, data in json_lines(text, str(source), NeedleFileError):
        where = f"{source}:{line_no}"
        instance = _instance(data, where, line_no)
        if instance.id in seen:
            raise NeedleFileError(f"{where}: id {instance.id!r} already used on line {seen[instance.id]}")
        seen[instance.id] = line_no
        out.append(instance)
    if not out:
        raise NeedleFileError(f"{source}: no instances (one JSON object per line)")
    return out


# ---- encoding --------------------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_instance(tokenizer, instance: NeedleInstance, distance: int, chat: bool = True) -> EncodedInstance:
    """The token ids of ``instance`` with exactly ``distance`` filler tokens; raises :class:`NeedleFileError`
    when the filler is shorter than ``distance`` tokens."""
    from momentkv.models import chat_prompt

    if distance < 0:
        raise ValueError(f"a distance is a number of tokens >= 0, got {distance}")
    prompt_text = chat_prompt(tokenizer, instance.request) if chat else instance.request
    prompt = _ids(tokenizer, prompt_text)
    question = _ids(tokenizer, " " + instance.question)
    answer = _ids(tokenizer, " " + instance.answer)
    filler = _ids(tokenizer, " " + instance.filler.strip())
    if len(filler) < distance:
        raise NeedleFileError(f"instance {instance.id!r}: its filler has {len(filler)} tokens, fewer than the "
                              f"distance {distance}; give it a longer filler")
    end = _ids(tokenizer, instance.end) if instance.end else []
    fact = _ids(tokenizer, instance.lead) + question + answer + end
    # The filler's last tokens close a sentence (its cut would otherwise fall mid-sentence), so the question
    # starts a sentence as it did in the fact; the filler stays exactly ``distance`` tokens long.
    closing = end if 0 < len(end) <= distance else []
    generated = fact + filler[:distance - len(closing)] + closing + question
    start = len(generated)
    generated += answer
    return EncodedInstance(instance=instance, distance=distance, prompt=prompt, generated=generated,
                           answer_start=start, answer_end=len(generated), fact_end=len(fact))


# ---- the runner ------------------------------------------------------------------------------------------

def full_config() -> EvalConfig:
    """The full cache, run through the same loop as every policy."""
    return EvalConfig(label=FULL_LABEL, name=FULL_LABEL, budget=None, policy=load_policy("full.yaml"))


def row_key(model_name: str, config: EvalConfig, encoded: EncodedInstance) -> str:
    """What makes a result row reusable: the model, the policy (with its budget) and the instance's tokens."""
    policy = config.policy.model_dump(mode="json") if config.policy is not None else None
    data = json.dumps([model_name, config.label, policy, encoded.fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:20]


@torch.inference_mode()
def score_batch(model, policy, items: list[EncodedInstance], pad_id: int, label: str = "policy") -> list[dict]:
    """Teacher-force ``items`` as one left-padded batch under ``policy``; one score dict per item.

    Every generated token is fed one at a time through :func:`run_steps`. Rows whose generated part is
    shorter are padded on the right; their padding comes after their answer and is never scored.
    """
    device = next(model.parameters()).device
    input_ids, mask = left_pad([e.prompt for e in items], pad_id, device)
    steps = max(e.answer_end for e in items)
    fed = torch.full((len(items), steps), pad_id, dtype=torch.long, device=device)
    for row, e in enumerate(items):
        fed[row, : e.answer_end] = torch.tensor(e.generated[: e.answer_end], dtype=torch.long)
    logprob = torch.zeros(len(items), dtype=torch.float64)
    exact = torch.ones(len(items), dtype=torch.bool)
    first = torch.zeros(len(items), dtype=torch.bool)
    evicted_by_answer = [False] * len(items)
    with momentkv.patched(model, policy) as handle:
        cache = handle.new_cache()
        for step, logits, evicted in run_steps(model, cache, input_ids, mask, steps, lambda s, _: fed[:, s]):
            scored = [row for row, e in enumerate(items) if e.answer_start <= step < e.answer_end]
            if not scored:
                continue
            rows = torch.tensor(scored, device=logits.device)
            lp = torch.log_softmax(logits[rows], dim=-1)
            target = fed[rows, step].to(logits.device)
            logprob[rows.cpu()] += lp.gather(-1, target.view(-1, 1)).squeeze(-1).double().cpu()
            hit = (logits[rows].argmax(-1) == target).cpu()
            exact[rows.cpu()] &= hit
            for i, row in enumerate(scored):
                if step == items[row].answer_start:
                    first[row] = bool(hit[i])
                    evicted_by_answer[row] = bool(evicted)
        held = check_stored(cache.stats(), handle.policy, label)
    return [{"logprob": float(logprob[row]), "exact": bool(exact[row]), "first_token": bool(first[row]),
             "answer_tokens": e.answer_end - e.answer_start, "sequence_tokens": e.answer_end,
             "evicted": evicted_by_answer[row], "generated_slots": held.generated}
            for row, e in enumerate(items)]


def run_needle(model, tokenizer, instances: list[NeedleInstance], configs: list[EvalConfig], distances: list[int],
               model_name: str = "model", batch_size: int = 8, saved: dict[str, dict] | None = None, chat: bool = True,
               on_rows: Callable[[list[dict]], None] | None = None, progress=None) -> list[dict]:
    """Score every instance at every distance under the full cache and each of ``configs``.

    Returns one row per (config, distance, instance), in that order (the full cache first): ``policy`` (label), ``name``,
    ``budget``, ``distance``, ``instance``, ``kind``, ``answer``, ``logprob``, ``exact``, ``first_token``,
    ``answer_tokens``, ``sequence_tokens``, ``evicted`` (whether the cache had evicted by the answer),
    ``generated_slots``, ``seconds`` (the batch's wall time per row) and ``key`` (see :func:`row_key`).
    A row whose key is in ``saved`` (rows of an earlier run, by key) is taken from there, not computed: a run
    resumes from what it saved. ``on_rows`` receives each batch's new rows as soon as they exist;
    ``progress`` (a tqdm bar) is advanced by the rows computed.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    bad = [d for d in distances if d < 0]
    if bad:
        raise ValueError(f"distances are numbers of tokens >= 0, got {', '.join(map(str, bad))}")
    saved = dict(saved or {})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = {d: [encode_instance(tokenizer, inst, d, chat) for inst in instances] for d in distances}
    all_configs = [full_config()] + [c for c in configs if c.label != FULL_LABEL]
    out: list[dict] = []
    for config in all_configs:
        for distance in distances:
            keys = {id(e): row_key(model_name, config, e) for e in encoded[distance]}
            found = {keys[id(e)]: saved[keys[id(e)]] for e in encoded[distance] if keys[id(e)] in saved}
            todo = [e for e in encoded[distance] if keys[id(e)] not in saved]
            # Similar lengths share a batch, so little is padded.
            todo.sort(key=lambda e: (len(e.prompt), e.answer_end))
            for start in range(0, len(todo), batch_size):
                items = todo[start:start + batch_size]
                if progress is not None:
                    progress.set_description(f"{config.label} D={distance}")
                began = time.perf_counter()
                scores = score_batch(model, config.policy, items, pad_id, config.label)
                seconds = (time.perf_counter() - began) / len(items)
                rows = [{"policy": config.label, "name": config.name, "budget": config.budget, "distance": distance,
                         "instance": e.instance.id, "kind": e.instance.kind, "answer": e.instance.answer, **s,
                         "seconds": round(seconds, 4), "key": keys[id(e)]}
                        for e, s in zip(items, scores)]
                found.update((r["key"], r) for r in rows)
                if on_rows is not None:
                    on_rows(rows)
                if progress is not None:
                    progress.update(len(items))
            out.extend(found[keys[id(e)]] for e in encoded[distance])
    return out


def instance_dicts(instances: list[NeedleInstance]) -> list[dict]:
    return [asdict(i) for i in instances]


# ---- summary and plot ------------------------------------------------------------------------------------

def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    """One line per (policy, distance): exact match and answer log-probability over instances, each with its
    95% bootstrap interval (instances resampled, :func:`momentkv.eval.aggregate.bootstrap`), the paired
    difference of the log-probability to the full cache's on the same instances, and McNemar's exact test of
    the instances' exact matches against the full cache's and against ``recency@<budget>``'s where that ran
    (:func:`momentkv.eval.aggregate.mcnemar`)."""
    import numpy as np

    from momentkv.eval.aggregate import bootstrap, mcnemar, paired_difference

    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["distance"]), []).append(row)
    by_instance = {key: {r["instance"]: r for r in g} for key, g in groups.items()}
    out = []
    for (label, distance), group in groups.items():
        exact = bootstrap(np.array([float(r["exact"]) for r in group]), seed)
        logprob = bootstrap(np.array([r["logprob"] for r in group]), seed)
        base = by_instance.get((FULL_LABEL, distance), {})
        paired = [(r["logprob"], base[r["instance"]]["logprob"]) for r in group if r["instance"] in base]
        diff = paired_difference(np.array([a for a, _ in paired]), np.array([b for _, b in paired]), seed)
        line = {"policy": label, "budget": group[0]["budget"], "distance": distance, "n": len(group),
                "exact": exact.mean, "exact_low": exact.low, "exact_high": exact.high,
                "logprob": logprob.mean, "logprob_low": logprob.low, "logprob_high": logprob.high,
                "logprob_vs_full": diff.mean, "logprob_vs_full_low": diff.low, "logprob_vs_full_high": diff.high,
                "evicted": sum(bool(r["evicted"]) for r in group) / len(group)}
        others = {"full": FULL_LABEL, "recency": f"recency@{group[0]['budget']}"}
        for name, other_label in others.items():
            other = by_instance.get((other_label, distance), {})
            pairs = [(float(r["exact"]), float(other[r["instance"]]["exact"])) for r in group if r["instance"] in other]
            test = mcnemar(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])) if (
                pairs and other_label != label) else None
            line[f"exact_vs_{name}_only_policy"] = None if test is None else test.only_a
            line[f"exact_vs_{name}_only_other"] = None if test is None else test.only_b
            line[f"exact_vs_{name}_p"] = None if test is None else test.p
        out.append(line)
    return out


def _paired_cell(line: dict, name: str) -> str:
    if line.get(f"exact_vs_{name}_p") is None:
        return "—"
    return (f"{line[f'exact_vs_{name}_only_policy']}/{line[f'exact_vs_{name}_only_other']}, "
            f"p={line[f'exact_vs_{name}_p']:.2g}")


def markdown_summary(summary: list[dict]) -> str:
    """The summary as a Markdown table, one line per policy and distance. The paired columns give, for exact
    match, the instances only this policy recalls / only the other does, and McNemar's exact p-value."""
    lines = ["| policy | distance D | instances | exact match [95% CI] | answer log-prob [95% CI] | "
             "log-prob − full cache [95% CI] | exact vs full cache | exact vs recency | evicted by the answer |",
             "|---|---:|---:|---|---|---|---|---|---:|"]
    for s in sorted(summary, key=lambda s: (s["policy"] != FULL_LABEL, s["budget"] or 0, s["policy"], s["distance"])):
        vs_full = ("—" if s["policy"] == FULL_LABEL else
                   f"{s['logprob_vs_full']:+.2f} [{s['logprob_vs_full_low']:+.2f}, {s['logprob_vs_full_high']:+.2f}]")
        lines.append(f"| {s['policy']} | {s['distance']} | {s['n']} | {s['exact']:.2f} [{s['exact_low']:.2f}, "
                     f"{s['exact_high']:.2f}] | {s['logprob']:.2f} [{s['logprob_low']:.2f}, {s['logprob_high']:.2f}] "
                     f"| {vs_full} | {_paired_cell(s, 'full')} | {_paired_cell(s, 'recency')} | {s['evicted']:.0%} |")
    return "\n".join(lines) + "\n"


def plot_recall(summary: list[dict], budget: int | None, path: Path, title: str = "") -> None:
    """Exact match (left) and answer log-probability (right) against distance, one line per policy at
    ``budget`` and the full cache, with 95% bootstrap bands."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from momentkv.eval.report import _legend, _style

    chosen = [s for s in summary if s["policy"] == FULL_LABEL or s["budget"] == budget]
    labels = [FULL_LABEL] + sorted({s["policy"] for s in chosen} - {FULL_LABEL})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, label in enumerate(labels):
        points = sorted((s for s in chosen if s["policy"] == label), key=lambda s: s["distance"])
        if not points:
            continue
        # Every other colour of tab20, so neighbouring policies get different hues rather than two shades.
        style = {"color": "black", "marker": "o", "linestyle": "--"} if label == FULL_LABEL else _style(2 * (i - 1))
        x = [s["distance"] for s in points]
        for ax, key in zip(axes, ("exact", "logprob")):
            ax.plot(x, [s[key] for s in points], label=label, **style)
            ax.fill_between(x, [s[f"{key}_low"] for s in points], [s[f"{key}_high"] for s in points],
                            color=style["color"], alpha=0.15)
    for ax, what in zip(axes, ("exact match (greedy over the answer)", "answer log-probability (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({s["distance"] for s in chosen}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("distance D (generated tokens between the fact and the question)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    _legend(axes[0], axes)
    fig.suptitle(title or f"decode-time needle at decode budget {budget}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
