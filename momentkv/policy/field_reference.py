"""The field reference of ``docs/policies.md``, generated from the pydantic schema so the two cannot drift.

``python -m momentkv.policy.field_reference docs/policies.md`` rewrites the part of the file between the
``BEGIN``/``END`` markers; a test fails when the file differs from what this module generates.
Only components defined inside momentkv are listed (a scorer a user registers is documented by its user).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from momentkv.policy.annotations import Shape, field_shape
from momentkv.policy.schema import BudgetFraction, DecodePolicy, Policy, RatioBudget
from momentkv.prefill.base import prefill_class, prefill_names
from momentkv.scoring import Scorer, scorer_class, scorer_names

BEGIN = "<!-- BEGIN GENERATED REFERENCE: python -m momentkv.policy.field_reference docs/policies.md -->"
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


_KIND_NAMES = {"int": "integer", "float": "number", "str": "text", "bool": "true/false", "none": "null"}


def _describe_type(shape: Shape) -> str:
    if shape.kind == "union":
        return " or ".join(_describe_type(option) for option in shape.options)
    if shape.kind == "literal":
        return "one of " + ", ".join(f"`{choice}`" for choice in shape.choices)
    if shape.kind == "list":
        return f"list of {_describe_type(shape.item)}s"
    if shape.kind == "model":
        return "{fraction}" if shape.model is BudgetFraction else shape.model.__name__
    return _KIND_NAMES.get(shape.kind, shape.kind)


def _type_name(name: str, info) -> str:
    return _TYPE_NAMES.get(name) or _describe_type(field_shape(info))


def _range(info) -> str:
    """The field's own constraints (those on the whole value, not on a union's alternatives)."""
    shape = field_shape(info)
    bounds = shape.bounds
    interval = bounds.interval()
    if interval:
        return interval
    parts = []
    if bounds.low is not None:
        value, inclusive = bounds.low
        parts.append(f"{'>=' if inclusive else '>'} {value:g}")
    if bounds.high is not None:
        value, inclusive = bounds.high
        parts.append(f"{'<=' if inclusive else '<'} {value:g}")
    unit = "characters" if shape.kind == "str" else "items"
    if bounds.min_length is not None:
        parts.append(f"at least {bounds.min_length} {unit}")
    if bounds.max_length is not None:
        parts.append(f"at most {bounds.max_length} {unit}")
    if bounds.finite:
        parts.append("finite")
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
        "### Relative protection (`decode.sinks` or `decode.recent: {fraction}`)", "", _summary(BudgetFraction), "",
        field_table(BudgetFraction), "",
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
