"""From pydantic's validation errors to :class:`~momentkv.errors.Problem` records: file, line, path, expectation.

A pydantic error carries a ``loc`` such as ``('decode', 'budget', 'budget:ratio', 'cap')``: field names and
list indices, interleaved with the tags of unions. :func:`data_path` walks the loc along the data that was
validated, keeping the parts that exist there, which gives the path the user wrote
(``decode.budget.cap``) and, through the marks the YAML reader recorded, its line. Errors of components
(scorers, prefill compressors) and of cross-field rules arrive as one custom error carrying their own
problems with relative paths; they are expanded here, so every problem is reported on its own field.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError

from momentkv.errors import Problem


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


def data_path(loc: tuple, data: Any) -> tuple:
    """The part of ``loc`` that names places in ``data`` (union tags dropped; a missing last key kept)."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif i == len(loc) - 1 and isinstance(part, (str, int)) and not str(part).startswith("budget:"):
            path.append(part)  # a missing field: the parent's line, the field's name
            node = None
        # else: a union tag or a validator name, not a place in the data
    return tuple(path)


# ----------------------------------------------------------------- the schema behind a path
def _unwrap(annotation: Any) -> list:
    """The alternatives of an annotation, with Annotated/Optional/unions flattened."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [alt for arg in get_args(annotation) for alt in _unwrap(arg)]
    return [annotation]


def _model_for(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model class that validates ``value`` (a mapping) under ``annotation``, registries included."""
    from momentkv.prefill.base import PrefillCompressor, prefill_class
    from momentkv.scoring import Scorer, scorer_class

    if not isinstance(value, dict):
        return None
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            for base, lookup in ((Scorer, scorer_class), (PrefillCompressor, prefill_class)):
                if issubclass(alt, base):
                    try:
                        return lookup(value.get("type"))
                    except (KeyError, TypeError):
                        return None
            return alt
    return None


def _item_annotation(annotation: Any) -> Any:
    for alt in _unwrap(annotation):
        if get_origin(alt) is list:
            return get_args(alt)[0]
    return None


def _annotation_at(root: type[BaseModel], path: tuple, data: Any) -> tuple[Any, Any]:
    """``(annotation, value)`` at ``path``: the type the schema expects there and what the data holds."""
    annotation: Any = root
    value = data
    for part in path:
        if isinstance(part, str):
            model = _model_for(annotation, value)
            if model is None or part not in model.model_fields:
                return None, None
            annotation = model.model_fields[part].annotation
            value = value.get(part)
        else:
            annotation = _item_annotation(annotation)
            value = value[part] if isinstance(value, list) and 0 <= part < len(value) else None
        if annotation is None:
            return None, None
    return annotation, value


def model_at(root: type[BaseModel], path: tuple, data: Any) -> type[BaseModel] | None:
    """The model class (registered component classes included) that validates the mapping at ``path``."""
    annotation, value = _annotation_at(root, path, data)
    return _model_for(annotation, value) if annotation is not None else None


def constraints_at(root: type[BaseModel], path: tuple, data: Any) -> list:
    """The annotated-types constraints (Gt, Le, ...) on the value at ``path``."""
    if not path:
        return []
    if isinstance(path[-1], str):
        model = model_at(root, path[:-1], data)
        info = model.model_fields.get(path[-1]) if model is not None else None
        return list(info.metadata) if info is not None else []
    annotation, _ = _annotation_at(root, path, data)
    metadata = []
    while get_origin(annotation) is Annotated:
        args = get_args(annotation)
        for extra in args[1:]:
            metadata.extend(getattr(extra, "metadata", [extra]))
        annotation = args[0]
    return metadata


def _bounds(metadata) -> str | None:
    low = high = None
    for meta in metadata:
        if isinstance(meta, annotated_types.Gt):
            low = f"({meta.gt:g}"
        elif isinstance(meta, annotated_types.Ge):
            low = f"[{meta.ge:g}"
        elif isinstance(meta, annotated_types.Lt):
            high = f"{meta.lt:g})"
        elif isinstance(meta, annotated_types.Le):
            high = f"{meta.le:g}]"
    if low and high:
        return f"in {low}, {high}"
    return None


_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_TYPE_WORDS = {
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "text", "list_type": "a list",
    "model_type": "a mapping", "dict_type": "a mapping", "model_attributes_type": "a mapping",
}


def describe(error: dict, root: type[BaseModel], path: tuple, data: Any) -> str:
    """What was expected, in the policy's words, for one pydantic error."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUND_WORDS:
        bounds = _bounds(constraints_at(root, path, data))
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
        return "must be a single line"
    if kind == "budget_form":
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
            out.extend({"type": "rule", "loc": loc + tuple(at), "msg": msg, "ctx": {}} for at, msg in ctx["problems"])
        elif "at" in ctx:
            out.append({**error, "loc": loc + tuple(ctx["at"])})
        else:
            out.append({**error, "loc": loc})
    return out


def problems_from_validation(
    err: ValidationError, data: Any, marks: dict[tuple, tuple[str, int]], origin: str, root: type | None = None,
) -> list[Problem]:
    """One :class:`Problem` per error of ``err`` (raised validating ``data``), placed with ``marks``."""
    if root is None:
        from momentkv.policy.schema import Policy

        root = Policy
    problems = []
    for error in _flatten(err.errors(include_url=False)):
        path = data_path(error["loc"], data)
        mark = None
        for end in range(len(path), -1, -1):  # the deepest place the YAML reader saw
            mark = marks.get(path[:end])
            if mark is not None:
                break
        where, line = mark if mark is not None else (origin, None)
        problems.append(Problem(describe(error, root, path, data), where, line, format_path(path)))
    return sorted(set(problems), key=lambda p: (p.origin, p.line or 0, p.path, p.message))
