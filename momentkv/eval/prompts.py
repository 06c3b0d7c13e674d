"""The prompt set: JSONL records ``{"id", "kind", "split", "prompt"}``, one per line.

``kind`` is ``free`` (the answer depends mostly on what it has generated so far: stories, explanations,
step-by-step math, code, lists) or ``grounded`` (the answer must keep consulting the prompt: questions about
a given passage answered in order, rewriting or translating a given text, expanding a given list).
``split`` is ``tune`` or ``heldout``: policies are tuned on one and reported on the other.
The default set ships as package data (``prompts.jsonl`` beside this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from momentkv.errors import PolicyError
from momentkv.eval.jsonl import json_lines

KINDS = ("free", "grounded")
SPLITS = ("tune", "heldout")


class PromptFileError(PolicyError):
    """A prompt file that is missing, empty or malformed."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    kind: str = "free"
    split: str = "tune"


def default_prompts_path():
    return resources.files("momentkv.eval").joinpath("prompts.jsonl")


def _record(data, origin: str, line_no: int) -> PromptRecord:
    where = f"{origin}:{line_no}"
    if not isinstance(data, dict):
        raise PromptFileError(f"{where}: each line is a JSON object with a 'prompt' field")
    text = data.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    kind, split = data.get("kind", "free"), data.get("split", "tune")
    if kind not in KINDS:
        raise PromptFileError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if split not in SPLITS:
        raise PromptFileError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    return PromptRecord(id=str(data.get("id", f"line{line_no}")), prompt=text, kind=kind, split=split)


def load_prompts(path=None, split: str | None = None, kind: str | None = None) -> list[PromptRecord]:
    """Read a prompt file (the default set when ``path`` is None), optionally keeping one split or kind.

    Raises :class:`PromptFileError` for a missing, empty or malformed file, duplicate ids, or a filter that
    leaves nothing.
    """
    source = default_prompts_path() if path is None else Path(path)
    origin = "default prompt set" if path is None else str(path)
    if path is not None and not Path(path).is_file():
        raise PromptFileError(f"{origin}: no such prompt file")
    records, seen = [], set()
    for line_no, data in json_lines(source.read_text(encoding="utf-8"), origin, PromptFileError):
        record = _record(data, origin, line_no)
        if record.id in seen:
            raise PromptFileError(f"{origin}:{line_no}: duplicate prompt id {record.id!r}")
        seen.add(record.id)
        records.append(record)
    if not records:
        raise PromptFileError(f"{origin}: the prompt file holds no prompts")
    if split is not None:
        records = [r for r in records if r.split == split]
    if kind is not None:
        records = [r for r in records if r.kind == kind]
    if not records:
        raise PromptFileError(f"{origin}: no prompts with split={split!r} kind={kind!r}")
    return records


def encode_prompts(tokenizer, records: list[PromptRecord], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt, wrapped in the model's chat template when ``chat`` (and one exists)."""
    from momentkv.models import chat_prompt

    out = []
    for record in records:
        text = chat_prompt(tokenizer, record.prompt) if chat else record.prompt
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out
