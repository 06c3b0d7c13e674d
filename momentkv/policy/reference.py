"""The field reference of ``docs/policies.md``, generated from the pydantic schema so the two cannot drift.

``python -m momentkv.policy.reference docs/policies.md`` rewrites the part of the file between the
``BEGIN``/``END`` markers; a test fails when the file differs from what this module generates.
Only components defined inside momentkv are listed (a scorer a user registers is documented by its user).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from momentkv.policy.schema import DecodePolicy, Policy, RatioBudget
from momentkv.prefill.base import prefill_class, prefill_names
from momentkv.scoring import Scorer, scorer_class, scorer_names

BEGIN = "<!-- BEGIN GENERATED REFERENCE: python -m momentkv.policy.reference docs/policies.md -->"
END = "<!-- END GENERATED REFERENCE -->"

_TYPE_NAMES = {
    "budget": "integer, ratio budget or list of integers",
    "normalize": "one of `none`, `sum`, `max`, `zscore`, `rank`",
    "prefill": "prefill compressor",
    "decode": "mapping (below) or null",
    "type": "text",
    "scorers": "list of scorers",
    "uncompressed_layers": "list of integers",
}


def _describe_type(annotation) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _describe_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in get_args(annotation))
    if origin is list:
        return f"list of {_describe_type(get_args(annotation)[0])}s"
    simple = {int: "integer", float: "number", str: "text", bool: "true/false", type(None): "null"}
    if annotation in simple:
        return simple[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _type_name(name: str, info) -> str:
    return _TYPE_NAMES.get(name) or _describe_type(info.annotation)


def _range(info) -> str:
    low = high = ""
    parts = []
    for meta in info.metadata:
        for attr, word in (("gt", "> "), ("ge", ">= "), ("lt", "< "), ("le", "<= ")):
            value = getattr(meta, attr, None)
            if value is not None:
                if attr in ("gt", "ge"):
                    low = f"{'(' if attr == 'gt' else '['}{value:g}"
                else:
                    high = f"{value:g}{')' if attr == 'lt' else ']'}"
                parts.append(f"{word}{value:g}")
        unit = "characters" if info.annotation is str else "items"
        for attr, word in (("min_length", "at least {} {}"), ("max_length", "at most {} {}")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(word.format(value, unit))
        if getattr(meta, "allow_inf_nan", None) is False:
            parts.append("finite")
    if low and high:
        return f"{low}, {high}"
    return ", ".join(parts)


def _default(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return getattr(value, "type", type(value).__name__)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def field_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    """A Markdown table of ``model``'s fields: name, type, default, range, meaning."""
    rows = ["| field | type | default | range | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(name, info)} | {_default(info)} | {_range(info)} | {meaning} |")
    return "\n".join(rows)


def _summary(cls) -> str:
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def _components(title: str, names, lookup, skip: tuple[str, ...]) -> list[str]:
    out = []
    for name in names():
        cls = lookup(name)
        if not cls.__module__.startswith("momentkv."):
            continue
        out.append(f"### {title} `{name}`\n\n{_summary(cls)}\n")
        own = [f for f in cls.model_fields if f not in skip]
        out.append(field_table(cls, skip=skip) if own else "No parameters.")
        out.append("")
    return out


def render_reference() -> str:
    """The generated part of ``docs/policies.md`` (between the markers, markers excluded)."""
    parts = [
        "## Field reference", "",
        "### Policy (the top level)", "", field_table(Policy), "",
        "Besides these fields, a policy file may start with `extends: NAME` (see *Extending a policy*).", "",
        "### `decode`", "", field_table(DecodePolicy), "",
        "### Ratio budget (`decode.budget: {ratio, floor, cap}`)", "", _summary(RatioBudget), "",
        field_table(RatioBudget), "",
        "### Fields every scorer has", "",
        "`type` (required) is the name the scorer is registered under; the others:", "",
        field_table(Scorer, skip=("type",)), "",
    ]
    parts += _components("Scorer", scorer_names, scorer_class, skip=("type", "weight", "normalize"))
    parts += _components("Prefill compressor", prefill_names, prefill_class, skip=("type",))
    return "\n".join(parts).rstrip() + "\n"


def splice(document: str, generated: str) -> str:
    """``document`` with the text between the markers replaced by ``generated``."""
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return document[:start] + "\n" + generated + document[end:]


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "docs/policies.md")
    path.write_text(splice(path.read_text(encoding="utf-8"), render_reference()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
