"""One walk over the schema's type annotations, for every part that reads them.

A pydantic field's annotation nests ``Annotated`` metadata (bounds, lengths, union tags, validators), unions
(tagged or not, ``Optional`` included), ``Literal`` choices, lists and models. :func:`shape_of` turns it into
a :class:`Shape` tree once, and the three readers work on that tree instead of each unwrapping annotations
its own way:

- error messages (``policy/errors.py``): :func:`locate` follows a pydantic error location through the data
  and the schema together, giving the path the user wrote (union tags dropped) and the shape expected there;
- the field reference (``policy/field_reference.py``): type names and ranges;
- the Hypothesis strategies (``momentkv.testing``): values within each field's bounds.

Components (scorers, prefill compressors) are models whose class depends on the data: :func:`locate` looks
the written ``type`` up in the component's registry.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, Tag

from momentkv.registry import registry_for


@dataclass(frozen=True)
class Bounds:
    """The constraints annotated on one value: numeric bounds, lengths, finiteness."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    finite: bool = False

    @property
    def low(self) -> tuple[float, bool] | None:
        """``(value, inclusive)`` of the lower bound, ``None`` when unbounded."""
        return (self.ge, True) if self.ge is not None else (self.gt, False) if self.gt is not None else None

    @property
    def high(self) -> tuple[float, bool] | None:
        """``(value, inclusive)`` of the upper bound, ``None`` when unbounded."""
        return (self.le, True) if self.le is not None else (self.lt, False) if self.lt is not None else None

    def interval(self) -> str | None:
        """``(0, 1]`` when both ends are bounded, else ``None``."""
        if self.low is None or self.high is None:
            return None
        (low, low_in), (high, high_in) = self.low, self.high
        return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"

    def merged(self, metadata) -> Bounds:
        """These bounds with the constraints found in ``metadata`` (annotated-types objects, FieldInfo)."""
        values = dict(self.__dict__)
        for meta in metadata:
            for name in ("gt", "ge", "lt", "le"):
                if isinstance(meta, getattr(annotated_types, name.capitalize())):
                    values[name] = getattr(meta, name)
            if isinstance(meta, annotated_types.MinLen):
                values["min_length"] = meta.min_length
            if isinstance(meta, annotated_types.MaxLen):
                values["max_length"] = meta.max_length
            if getattr(meta, "allow_inf_nan", None) is False:
                values["finite"] = True
        return Bounds(**values)


@dataclass(frozen=True)
class Shape:
    """What an annotation accepts.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``str``, ``none``, ``literal`` (``choices``), ``list``
    (``item``), ``model`` (``model``: a pydantic class, possibly a component base), ``union`` (``options``)
    or ``other``. ``tag`` is the union tag this alternative carries (pydantic puts it in error locations).
    """

    kind: str
    bounds: Bounds = field(default_factory=Bounds)
    choices: tuple = ()
    item: Shape | None = None
    options: tuple[Shape, ...] = ()
    model: type[BaseModel] | None = None
    tag: str | None = None

    def alternatives(self) -> tuple[Shape, ...]:
        """The non-union shapes this one accepts (itself, or a union's alternatives, flattened)."""
        if self.kind != "union":
            return (self,)
        return tuple(alt for option in self.options for alt in option.alternatives())


_SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", type(None): "none"}


def _flatten_metadata(metadata) -> list:
    """``Field(ge=1)`` inside ``Annotated`` arrives as a FieldInfo: its constraints are in its ``metadata``."""
    out = []
    for meta in metadata:
        inner = getattr(meta, "metadata", None)
        out.extend(inner if isinstance(inner, list) else [meta])
    return out


def shape_of(annotation: Any, metadata=()) -> Shape:
    """The :class:`Shape` of ``annotation``, with the field-level ``metadata`` (e.g. ``FieldInfo.metadata``).

    Metadata of a union applies to each alternative (pydantic applies ``min_length`` of an ``Optional`` list
    to the list), and stays on the union too, where the reference reads a field's own range.
    """
    metadata = _flatten_metadata(metadata)
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return shape_of(inner, [*metadata, *extra])
    tag = next((m.tag for m in metadata if isinstance(m, Tag)), None)
    bounds = Bounds().merged(metadata)
    if origin in (Union, types.UnionType):
        inherited = [m for m in metadata if not isinstance(m, Tag)]
        options = tuple(shape_of(arg, inherited) for arg in get_args(annotation))
        return Shape("union", bounds, options=options, tag=tag)
    if origin is Literal:
        return Shape("literal", bounds, choices=get_args(annotation), tag=tag)
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return Shape("list", bounds, item=shape_of(item), tag=tag)
    if annotation in _SIMPLE:
        return Shape(_SIMPLE[annotation], bounds, tag=tag)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Shape("model", bounds, model=annotation, tag=tag)
    return Shape("other", bounds, tag=tag)


def field_shape(info) -> Shape:
    """The shape of a pydantic field (``model.model_fields[name]``)."""
    return shape_of(info.annotation, info.metadata)


def _matches(shape: Shape, value: Any) -> bool:
    """Whether ``value``'s Python type is the kind of value ``shape`` takes (no bounds checked)."""
    kind = shape.kind
    if kind == "model":
        return isinstance(value, (dict, BaseModel))
    if kind == "list":
        return isinstance(value, (list, tuple))
    if kind == "none":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("str", "literal"):
        return isinstance(value, str) or kind == "literal"
    return False


def model_of(shape: Shape, value: Any) -> type[BaseModel] | None:
    """The model class that validates ``value`` under ``shape``: a component's registered class for its
    ``type``, else the annotated model; ``None`` if ``shape`` takes no model."""
    for alt in shape.alternatives():
        if alt.kind == "model":
            registry = registry_for(alt.model)
            if registry is None:
                return alt.model
            return registry.resolve(value) or alt.model  # an unknown type: the base's fields (type, ...)
    return None


def _select(shape: Shape, value: Any, part: Any) -> tuple[Shape, bool]:
    """The alternative of a union that ``value`` is validated as: the one ``part`` (the next part of an
    error location) names by its tag, else the first whose kind fits the value. True: ``part`` was a tag."""
    if shape.kind != "union":
        return shape, False
    options = shape.alternatives()
    for alt in options:
        if alt.tag is not None and alt.tag == part:
            return alt, True
    for alt in options:
        if _matches(alt, value):
            return alt, False
    return shape, False


def locate(root: Shape, loc: tuple, data: Any) -> tuple[tuple, Shape | None]:
    """Follow a pydantic error location through ``data`` and the schema ``root`` together.

    Returns the path as the user wrote it (field names and list indices; union tags and validator names,
    which are no place in the data, dropped; a missing or unknown field's name kept) and the shape the
    schema expects there (``None`` past an unknown field).
    """
    path: list = []
    shape: Shape | None = root
    node = data
    for part in loc:
        if shape is not None:
            shape, was_tag = _select(shape, node, part)
            if was_tag:
                continue
        if isinstance(part, int) and not isinstance(part, bool):
            if isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
            else:
                node = None
            path.append(part)
            item = next((alt.item for alt in shape.alternatives() if alt.kind == "list"), None) if shape else None
            shape = item
            continue
        model = model_of(shape, node) if shape is not None else None
        if model is not None and part in model.model_fields:
            shape = field_shape(model.model_fields[part])
        elif isinstance(node, dict) and part in node:
            shape = None  # an unknown field: a place in the data, outside the schema
        else:
            continue  # a union tag or a validator's name
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return tuple(path), shape
