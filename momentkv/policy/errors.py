"""From pydantic's validation errors to :class:`~momentkv.errors.Problem` records: file, line, path, expectation.

A pydantic error carries a ``loc`` such as ``('decode', 'budget', 'budget:ratio', 'cap')``: field names and
list indices, interleaved with the tags of unions. :func:`~momentkv.policy.annotations.locate` walks the loc
along the data that was validated and the schema together, keeping the parts that are places in the data,
which gives the path the user wrote (``decode.budget.cap``), through the marks the YAML reader recorded its
line, and the bounds expected there. Errors of components
(scorers, prefill compressors) and of cross-field rules arrive as one custom error carrying their own
problems with relative paths; they are expanded here, so every problem is reported on its own field.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from momentkv.errors import Problem
from momentkv.policy.annotations import Shape, locate, model_of, shape_of
from momentkv.policy.yaml12 import yaml11_hint


def format_path(path: tuple) -> str:
    """``('decode', 'scorers', 1, 'alpha')`` -> ``decode.scorers[1].alpha``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def show(value: Any, limit: int = 40) -> str:
    """A value as the user wrote it in YAML: ``null``, ``true``, ``'text'``, ``1.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def data_path(loc: tuple, data: Any, root: type[BaseModel] | None = None) -> tuple:
    """The part of ``loc`` that names places in ``data``: union tags and validator names dropped, a missing
    or unknown field's name kept (see :func:`~momentkv.policy.annotations.locate`)."""
    return locate(shape_of(_root(root)), loc, data)[0]


def _root(root: type[BaseModel] | None) -> type[BaseModel]:
    if root is not None:
        return root
    from momentkv.policy.schema import Policy

    return Policy


def model_at(root: type[BaseModel], path: tuple, data: Any) -> type[BaseModel] | None:
    """The model class (registered component classes included) that validates the mapping at ``path``."""
    _, shape = locate(shape_of(root), path, data)
    if shape is None:
        return None
    node = data
    for part in path:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    return model_of(shape, node)


def _has(node, part) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_TYPE_WORDS = {
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "text", "list_type": "a list",
    "model_type": "a mapping", "dict_type": "a mapping", "model_attributes_type": "a mapping",
}


def describe(error: dict, root: type[BaseModel], path: tuple, data: Any, shape: Shape | None = None,
             from_yaml: bool = False) -> str:
    """What was expected, in the policy's words, for one pydantic error (``shape``: what the schema expects
    at the error's place, from :func:`~momentkv.policy.annotations.locate`). ``from_yaml``: the value was
    read from YAML, so text where a number or a boolean belongs says what YAML 1.1 would have read."""
    message = _expected(error, root, path, data, shape)
    got = error.get("input")
    hint = yaml11_hint(got) if from_yaml and isinstance(got, str) and error["type"] in _TYPED else None
    return f"{message}; {hint}" if hint else message


_TYPED = {*_TYPE_WORDS, "budget_form", "protection_form", "capacity_form"} - {"string_type"}


def _expected(error: dict, root: type[BaseModel], path: tuple, data: Any, shape: Shape | None) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUND_WORDS:
        interval = shape.bounds.interval() if shape is not None else None
        bounds = f"in {interval}" if interval else None
        limit = next(iter(ctx.values()), "?")
        limit = f"{limit:g}" if isinstance(limit, float) else limit
        return f"must be {bounds or f'{_BOUND_WORDS[kind]} {limit}'}, got {show(got)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        model = model_at(root, path[:-1], data)
        if model is None:
            return "unknown field"
        fields = [name for name in model.model_fields]
        close = difflib.get_close_matches(str(path[-1]), fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field{hint} (fields: {', '.join(fields)})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '?')}, got {show(got)}"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}, got {show(got)}"
    if kind == "finite_number":
        return f"must be a finite number, got {show(got)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx.get('pattern', '?')}"
    if kind in ("budget_form", "protection_form", "capacity_form"):
        return f"{error['msg']}, got {show(got)}"
    message = error["msg"]
    return message[len("Value error, "):] if message.startswith("Value error, ") else message


def _flatten(errors: list[dict], prefix: tuple = ()) -> list[dict]:
    """Expand component and cross-field errors into one error per field, with loc relative to the root."""
    out = []
    for error in errors:
        loc = prefix + tuple(error["loc"])
        ctx = error.get("ctx") or {}
        if error["type"] == "component_invalid":
            out.extend(_flatten(ctx["errors"], loc))
        elif error["type"] == "policy_rule":
            for at, msg, *others in ctx["problems"]:
                others = [(loc + tuple(other), text) for other, text in (others[0] if others else [])]
                out.append({"type": "rule", "loc": loc + tuple(at), "msg": msg, "ctx": {"others": others}})
        elif "at" in ctx:
            out.append({**error, "loc": loc + tuple(ctx["at"])})
        else:
            out.append({**error, "loc": loc})
    return out


Mark = tuple[str, "int | None"]


def problems_from_validation(
    err: ValidationError, data: Any, marks: dict[tuple, Mark], origin: str, root: type | None = None,
    layers: tuple[str, ...] = (),
) -> list[Problem]:
    """One :class:`Problem` per error of ``err`` (raised validating ``data``), placed with ``marks``.

    ``layers``: the origins of the data, the one written last first (an extending file, then its base...).
    A rule between fields is reported at the field written last (see :func:`_place_rule`).
    """
    root = _root(root)
    root_shape = shape_of(root)
    problems = []
    for error in _flatten(err.errors(include_url=False)):
        path, shape = locate(root_shape, error["loc"], data)
        mark = None
        for end in range(len(path), -1, -1):  # the deepest place the YAML reader saw
            mark = marks.get(path[:end])
            if mark is not None:
                break
        where, line = mark if mark is not None else (origin, None)
        message = describe(error, root, path, data, shape, from_yaml=line is not None)
        others = (error.get("ctx") or {}).get("others")
        if others:
            candidates = [(path, message, (where, line))]
            for loc, text in others:
                other = locate(root_shape, loc, data)[0]
                candidates.append((other, text, marks.get(other)))  # only where written: a default moves nothing
            path, message, (where, line) = _place_rule(candidates, data, layers or (origin,))
        problems.append(Problem(message, where, line, format_path(path)))
    return sorted(set(problems), key=lambda p: (p.origin, p.line or 0, p.path, p.message))


def _place_rule(candidates: list[tuple[tuple, str | None, Mark | None]], data: Any,
                layers: tuple[str, ...]) -> tuple[tuple, str, Mark]:
    """Where to report a rule between fields, and what to say there.

    ``candidates``: ``(path, message there or None, where it was written or None)``, the rule's own field
    first. The problem goes to the field written last (the earliest origin in ``layers``; on a tie, the rule's
    own field): a user who extends ``moment.yaml`` with ``recent: 200`` reads about ``recent`` on their own
    line, not about ``moment.yaml``'s budget. The other fields the rule reads that were written elsewhere are
    named with their place, so both ends of the conflict are in the message.
    """
    def rank(mark: Mark) -> int:
        return layers.index(mark[0]) if mark[0] in layers else len(layers)

    path, message, mark = min((c for c in candidates if c[1] is not None and c[2] is not None),
                              key=lambda c: rank(c[2]))
    named = [f"{format_path(p)} is {_written(_value_at(data, p))} ({_where(m)})" for p, _, m in candidates
             if p != path and m is not None and m[0] != mark[0]]
    return path, message + (f"; {', '.join(named)}" if named else ""), mark


def _where(mark: Mark) -> str:
    return f"{mark[0]}:{mark[1]}" if mark[1] is not None else mark[0]


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _written(value: Any) -> str:
    """A value as YAML writes it in flow style: ``17``, ``0.5``, ``{fraction: 0.5}``, ``[256, 128]``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_written(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_written(item) for item in value) + "]"
    return show(value)
