"""YAML 1.2's core schema for PyYAML: which plain scalars are null, booleans, integers and floats.

PyYAML resolves plain scalars by YAML 1.1, where ``064`` is 52 (octal), ``1_000`` is 1000, ``yes``, ``on``
and ``y`` are true, ``1:30`` is 90 (base 60) and ``2024-01-01`` a date, while ``1e-6`` and ``0o100`` are text.
The policy language reads YAML 1.2's core schema instead (what the YAML 1.2 specification and most current
YAML tools read), and only it:

========  ===========================================================================================
null      ``~``, ``null``, ``Null``, ``NULL``, nothing
bool      ``true``, ``True``, ``TRUE``, ``false``, ``False``, ``FALSE``
int       ``[-+]?[0-9]+``, ``0o[0-7]+`` (octal), ``0x[0-9a-fA-F]+`` (hex)
float     ``[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?``, ``[-+]?.inf``, ``.nan`` (and the
          ``Inf``/``INF``, ``NaN``/``NAN`` spellings)
========  ===========================================================================================

Everything else is text. One form is refused rather than read: a decimal integer with a leading zero
(``064``), which both versions read as a number, with different values (YAML 1.1: octal 52; YAML 1.2: 64),
so that a file means the same thing to every YAML tool that reads it as a number. The other forms whose
meaning differs (``1_000``, ``yes``/``no``/``on``/``off``, ``1:30``, ``0b101``) are text in YAML 1.2: a text
field takes them as written, and a number or boolean field refuses them with :func:`yaml11_hint`, which says
what YAML 1.1 would have read and what to write instead.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

NULL = "tag:yaml.org,2002:null"
BOOL = "tag:yaml.org,2002:bool"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
MERGE = "tag:yaml.org,2002:merge"

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")
_MERGE_KEY = re.compile(r"^(?:<<)$")

# (tag, pattern, the characters a match can start with); ints before floats: `12` is an integer.
CORE_SCHEMA = [
    (NULL, _NULL, ["~", "n", "N", ""]),
    (BOOL, _BOOL, list("tTfF")),
    (INT, _INT, list("-+0123456789")),
    (FLOAT, _FLOAT, list("-+.0123456789")),
]


class NotPortable(ValueError):
    """A scalar that YAML 1.1 and YAML 1.2 both read as a number, with different values (``064``)."""


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    if _LEADING_ZERO.match(text):
        raise NotPortable(leading_zero_message(text))
    if not _INT.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _construct_float(loader, node) -> float:
    text = loader.construct_scalar(node)
    if not _FLOAT.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 float", node.start_mark)
    if text.lower().lstrip("+-") == ".inf":
        return -math.inf if text.startswith("-") else math.inf
    if text.lower() == ".nan":
        return math.nan
    return float(text)


def _construct_bool(loader, node) -> bool:
    text = loader.construct_scalar(node)
    if not _BOOL.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 boolean", node.start_mark)
    return text.lower() == "true"


def use_core_schema(loader: type[yaml.SafeLoader]) -> None:
    """Make ``loader`` (a SafeLoader subclass) resolve and construct plain scalars by YAML 1.2's core schema.

    PyYAML's YAML 1.1 resolvers are dropped (no ``yes``, ``1_000``, ``1:30``, dates or ``=`` as anything but
    text); ``<<`` still resolves to a merge key, so that the reader can refuse it by name.
    """
    loader.yaml_implicit_resolvers = {}
    for tag, pattern, first in CORE_SCHEMA:
        loader.add_implicit_resolver(tag, pattern, first)
    loader.add_implicit_resolver(MERGE, _MERGE_KEY, ["<"])
    loader.add_constructor(INT, _construct_int)
    loader.add_constructor(FLOAT, _construct_float)
    loader.add_constructor(BOOL, _construct_bool)


def quote_core_schema(dumper: type[yaml.SafeDumper]) -> None:
    """Make ``dumper`` quote every string that YAML 1.2's core schema would read as something else.

    The dumper keeps PyYAML's YAML 1.1 resolvers too, so a string is written plain only when both versions
    read it as text (``'yes'`` and ``'064'`` stay quoted, as ``'1e-6'`` and ``'0o7'`` now are).
    """
    for tag, pattern, first in CORE_SCHEMA:
        dumper.add_implicit_resolver(tag, pattern, first)


_YAML11 = yaml.resolver.Resolver()


def yaml11_reading(text: str) -> tuple[str, Any] | None:
    """``(tag, value)`` that YAML 1.1 (PyYAML) reads the plain scalar ``text`` as, or ``None`` for text."""
    tag = _YAML11.resolve(yaml.ScalarNode, text, (True, False))
    if tag not in (NULL, BOOL, INT, FLOAT):
        return None
    try:
        return tag, yaml.SafeLoader("").construct_object(yaml.ScalarNode(tag, text))
    except (ValueError, yaml.YAMLError):
        return None


def _write(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isinf(value):
        return "-.inf" if value < 0 else ".inf"
    return repr(value)


def yaml11_hint(text: str) -> str | None:
    """Why the text ``text`` is not the number or boolean it looks like, and what to write; ``None`` if it
    is text in YAML 1.1 too (``1_000`` -> ``YAML 1.2 reads 1_000 as text (YAML 1.1 as 1000): write 1000``)."""
    if any(pattern.match(text) for _, pattern, _ in CORE_SCHEMA):
        return None  # YAML 1.2 reads it as a number too: it was quoted, and is text in both versions
    reading = yaml11_reading(text)
    if reading is None or text != text.strip():
        return None
    _, value = reading
    if value is None:
        return None
    what = " (base 60)" if ":" in text else ""
    return f"YAML 1.2 reads {text} as text (YAML 1.1 as {_write(value)}{what}): write {_write(value)}"


def leading_zero_message(text: str) -> str:
    """The refusal of an integer with a leading zero: both readings, and what to write for each."""
    digits = text.lstrip("+-")
    decimal = int(text)
    reading = yaml11_reading(text)
    old = f"octal {_write(reading[1])}" if reading is not None and reading[0] == INT else "text"
    octal = f", 0o{digits.lstrip('0') or '0'} for the octal number" if text[0].isdigit() and \
        set(digits) <= set("01234567") else ""
    return (f"{text} has a leading zero, which YAML 1.1 reads as {old} and YAML 1.2 as {decimal}: write "
            f"{decimal}{octal}, or '{text}' (quoted) for text")
