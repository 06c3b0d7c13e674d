"""Loading a policy from a built-in name, a YAML path, YAML text, a mapping or a :class:`Policy`.

YAML is composed with PyYAML's safe loader into a node tree (no Python object is ever constructed from a
tag), and the tree is turned into plain data by :func:`_NodeReader`, which also records the line of every
field. Duplicate keys, merge keys (``<<``), non-standard tags, documents that nest deeper than
:data:`MAX_DEPTH` or expand (through aliases) to more than :data:`MAX_NODES` nodes are refused, so arbitrary
input can neither build objects nor blow up. Validation errors from pydantic are mapped back through their
field path to that line: every problem is a :class:`momentkv.PolicyError` such as
``moment.yaml:7 decode.scorers[1].alpha: must be in (0, 1], got 1.5``, and all problems of a file are
reported together.

``extends: NAME`` starts from another policy (a path relative to the extending file, else a built-in name)
and overrides it; see :func:`merge_policy_data` for the rules.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from momentkv.errors import PolicyError, Problem
from momentkv.policy.errors import format_path, problems_from_validation
from momentkv.policy.schema import Policy
from momentkv.policy.yaml12 import NotPortable, use_core_schema

PolicySource = Policy | dict | str | Path

MAX_TEXT = 1_000_000  # characters in one policy file
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 20_000  # nodes after expanding aliases (guards against "billion laughs")
MAX_EXTENDS = 16  # length of an extends chain

_STANDARD_TAGS = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}
_SCALAR_TYPES = (str, int, float, bool, type(None))


@dataclass
class PolicyData:
    """Plain policy data with the place each field came from: ``marks[path] = (origin, line)`` (line ``None``
    for a mapping given in Python); ``layers``: the origins merged into it by ``extends``, the extending one
    first (empty: ``origin`` alone)."""

    data: Any
    origin: str
    marks: dict[tuple, tuple[str, int | None]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()


def _marks_of(data: Any, origin: str) -> dict[tuple, tuple[str, None]]:
    """The paths of plain ``data`` placed in ``origin`` (a mapping has no lines): a value that a mapping
    overrides is then never placed on the line of the base that it replaced. At most :data:`MAX_NODES` paths
    :data:`MAX_DEPTH` deep (a mapping given in Python may hold itself)."""
    marks: dict[tuple, tuple[str, None]] = {}
    todo = [((), data)]
    while todo and len(marks) < MAX_NODES:
        path, value = todo.pop()
        marks[path] = (origin, None)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        if len(path) < MAX_DEPTH:
            todo.extend((path + (key,), child) for key, child in children)
    return marks


class _DepthLimitedLoader(yaml.SafeLoader):
    """The safe loader, composing nodes only, with a bound on nesting (PyYAML's composer recurses), reading
    scalars by YAML 1.2's core schema (see :mod:`momentkv.policy.yaml12`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


use_core_schema(_DepthLimitedLoader)


def _yaml_problem(err: yaml.YAMLError, origin: str) -> Problem:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        message = " ".join(part for part in (err.context, err.problem) if part) or str(err)
        return Problem(f"invalid YAML: {message}", origin, mark.line + 1 if mark else None)
    if isinstance(err, yaml.reader.ReaderError):
        return Problem(f"invalid YAML: {err.reason} (character {err.character!r})", origin)
    return Problem(f"invalid YAML: {err}", origin)


class _NodeReader:
    """Turns a composed node tree into plain data, recording the line of every path."""

    def __init__(self, loader: yaml.SafeLoader, origin: str):
        self.loader = loader
        self.origin = origin
        self.marks: dict[tuple, tuple[str, int]] = {}
        self.problems: list[Problem] = []
        self.count = 0

    def problem(self, message: str, node, path: tuple) -> None:
        self.problems.append(Problem(message, self.origin, node.start_mark.line + 1, format_path(path)))

    def read(self, node, path: tuple = (), line: int | None = None) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise PolicyError(Problem(f"document too large: more than {MAX_NODES} nodes (aliases included)", self.origin))
        if len(path) > MAX_DEPTH:
            raise PolicyError(Problem(f"nested deeper than {MAX_DEPTH} levels (a recursive alias?)", self.origin))
        self.marks.setdefault(path, (self.origin, line if line is not None else node.start_mark.line + 1))
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if node.tag != _STANDARD_TAGS[type(node)]:
            self.problem(f"tag {node.tag!r} is not allowed in a policy", node, path)
            return None
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.mapping(node, path)

    def scalar(self, node, path: tuple) -> Any:
        try:
            value = self.loader.construct_object(node)
        except NotPortable as err:
            self.problem(str(err), node, path)
            return None
        except Exception as err:  # noqa: BLE001  (a bad int, date, tag... in arbitrary text is the user's error)
            self.problem(f"cannot read value {node.value[:40]!r}: {getattr(err, 'problem', None) or err}", node, path)
            return None
        if not isinstance(value, _SCALAR_TYPES):
            self.problem(f"a {type(value).__name__} ({node.value[:40]!r}) is not allowed in a policy", node, path)
            return None
        return value

    def mapping(self, node, path: tuple) -> dict:
        out: dict = {}
        first_line: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                what = "merge keys (<<) are not supported, use extends" if isinstance(key_node, yaml.ScalarNode) \
                    else "a key must be a plain name"
                self.problem(what, key_node, path)
                continue
            key = self.scalar(key_node, path)
            if not isinstance(key, str):
                self.problem(f"keys are names, got {key!r}", key_node, path)
                continue
            key_line = key_node.start_mark.line + 1
            if key in out:
                self.problem(f"duplicate key {key!r} (first on line {first_line[key]})", key_node, path + (key,))
                continue
            first_line[key] = key_line
            out[key] = self.read(value_node, path + (key,), line=key_line)
        return out


def parse_policy_yaml(text: str, origin: str = "<text>") -> PolicyData:
    """Parse one YAML document into plain data and field lines; :class:`PolicyError` for anything wrong."""
    if not isinstance(text, str):
        raise PolicyError(Problem(f"policy text must be a str, got {type(text).__name__}", origin))
    if len(text) > MAX_TEXT:
        raise PolicyError(Problem(f"file too large: {len(text)} characters, at most {MAX_TEXT}", origin))
    loader = None
    try:
        loader = _DepthLimitedLoader(text)  # the reader checks the characters here already
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(Problem("empty: a policy is a mapping of fields (name, decode, ...)", origin))
        reader = _NodeReader(loader, origin)
        data = reader.read(node)
    except yaml.YAMLError as err:
        raise PolicyError(_yaml_problem(err, origin)) from None
    except RecursionError:
        raise PolicyError(Problem(f"nested too deeply (at most {MAX_DEPTH} levels)", origin)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if reader.problems:
        raise PolicyError(reader.problems)
    if not isinstance(data, dict):
        raise PolicyError(Problem(f"a policy is a mapping of fields, got {_kind(data)}", origin, 1))
    return PolicyData(data, origin, reader.marks)


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", type(None): "nothing"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------- sources and extends
def builtin_policy_dir():
    """The folder of built-in policies (installed as the package ``momentkv.policies``)."""
    return resources.files("momentkv.policies")


def builtin_policy_names() -> list[str]:
    """Names of the built-in policies, e.g. ``moment.yaml``."""
    return sorted(p.name for p in builtin_policy_dir().iterdir() if p.name.endswith(".yaml"))


def _builtin_name(name: str) -> str | None:
    if "/" in name or "\\" in name:
        return None
    name = name if name.endswith(".yaml") else f"{name}.yaml"
    return name if name in builtin_policy_names() else None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte...
        return False


_NOT_FILES = [
    (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
]


def _what_is(path: Path) -> str | None:
    """``"file"`` for a regular file, what else ``path`` is (``"a directory"``...), ``None`` if nothing."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # missing, a name too long, a NUL byte...
        return None
    if stat.S_ISREG(mode):
        return "file"
    return next((what for test, what in _NOT_FILES if test(mode)), "not a regular file")


def _read_file(path: Path, reference: str, origin: str, line: int | None, path_text: str) -> str:
    """The text of the regular file ``path``, reading at most :data:`MAX_TEXT` + 1 bytes of it."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TEXT + 1)
            size = os.fstat(f.fileno()).st_size
        if len(data) > MAX_TEXT:
            raise PolicyError(Problem(f"file too large: {max(size, len(data)):,} bytes, at most {MAX_TEXT:,}",
                                      origin, line, path_text))
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(Problem(f"cannot read {reference}: {err}", origin, line, path_text)) from None


_BUILTIN = "<built-in>"  # the "folder" of a built-in policy: its extends name built-ins only


def _near_builtin(reference: str) -> str | None:
    """The built-in policy whose name is closest to ``reference`` (``moment.yml`` -> ``moment.yaml``)."""
    if "/" in reference or "\\" in reference:
        return None
    names = builtin_policy_names()
    if "." not in reference:
        names = [n.removesuffix(".yaml") for n in names]
    close = difflib.get_close_matches(reference, names, n=1, cutoff=0.75)
    return close[0] if close else None


def _open(reference: str, base_dir, origin: str, line: int | None) -> tuple[str, str, Any, str]:
    """Find ``reference``: ``(display name, text, folder for relative extends, identity for cycles)``.

    ``base_dir`` is the extending file's folder, ``None`` for the working directory, or ``_BUILTIN``.
    A regular file comes first, then a built-in name; a directory, device or pipe of that name is named as
    what it is (never opened: a pipe would block, a device never end).
    """
    candidate = Path(reference) if base_dir is None else None if base_dir == _BUILTIN else base_dir / reference
    path_text = "extends" if line is not None else ""
    what = _what_is(candidate) if reference and candidate is not None else None
    if what == "file":
        text = _read_file(candidate, reference, origin, line, path_text)
        return str(Path(reference) if base_dir is None else candidate), text, candidate.parent, str(candidate.resolve())
    builtin = _builtin_name(reference) if reference else None
    if builtin is not None:
        text = builtin_policy_dir().joinpath(builtin).read_text(encoding="utf-8")
        return builtin, text, _BUILTIN, f"builtin:{builtin}"
    if what is not None:
        relative = base_dir is not None and not Path(reference).is_absolute()
        shown = f"{reference!r} ({candidate})" if relative else repr(reference)
        raise PolicyError(Problem(f"{shown} is {what}, not a policy file", origin, line, path_text))
    where = f" (looked in {base_dir})" if isinstance(base_dir, Path) else ""
    near = _near_builtin(reference)
    builtins = ", ".join(builtin_policy_names())
    hint = f"; did you mean {near!r}? (built-ins: {builtins})" if near else f"; built-ins: {builtins}"
    raise PolicyError(Problem(
        f"{reference!r}: no such policy file{where}, and not a built-in policy{hint}", origin, line, path_text,
    ))


def merge_policy_data(base: Any, override: Any) -> Any:
    """Deep-merge ``override`` onto ``base`` (the ``extends`` rule).

    - mappings merge key by key, recursively;
    - a mapping whose ``type`` differs from the base's (another scorer or compressor) replaces it whole;
    - everything else, lists included, replaces: ``scorers: [...]`` is the new list, ``decode: null``
      switches decode-time eviction off, ``budget: {ratio: 0.5}`` replaces ``budget: 128``.
    """
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "type" in override and override.get("type") != base.get("type"):
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_policy_data(base[key], value) if key in base else value
    return merged


def _merged_marks(data: Any, base: dict, override: dict, path: tuple = ()) -> dict:
    """Marks for the merged ``data``: where the override wrote a path, its line; elsewhere the base's."""
    marks = {}
    mark = override.get(path) or base.get(path)
    if mark is not None:
        marks[path] = mark
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in children:
        marks.update(_merged_marks(value, base, override, path + (key,)))
    return marks


def _changed_paths(data: Any, path: tuple) -> list[str]:
    """The fields ``data`` (an override, at ``path``) writes: leaves, with a component (a mapping with a
    ``type``) named as a whole."""
    if isinstance(data, dict) and data and "type" not in data:
        return [p for key, value in data.items() for p in _changed_paths(value, path + (key,))]
    return [format_path(path)]


def _inherited_description(base_name: str, override: dict) -> str | None:
    """The description an extending policy gets when it writes none: the base's while it keeps the base's
    method, otherwise one that says what it changed (``None``: keep the base's).

    A policy that changes ``prefill`` or ``decode`` is another method; the base's description would describe
    what it no longer does.
    """
    if "description" in override or not any(key in override for key in ("prefill", "decode")):
        return None
    changed = [p for key in ("prefill", "decode") if key in override for p in _changed_paths(override[key], (key,))]
    return f"Extends {base_name}, changing {', '.join(changed)}."


def resolve_extends(doc: PolicyData, base_dir, chain: tuple[str, ...] = ()) -> PolicyData:
    """Apply ``doc``'s ``extends`` (recursively); returns data without ``extends``.

    Fields the extending policy writes replace the base's (:func:`merge_policy_data`); ``description`` follows
    :func:`_inherited_description`.
    """
    if "extends" not in doc.data:
        return doc
    data = dict(doc.data)
    reference = data.pop("extends")
    origin, line = doc.marks.get(("extends",), (doc.origin, None))
    if not isinstance(reference, str) or not reference:
        raise PolicyError(Problem(
            f"must be a policy name or a path relative to this file, got {reference!r}", origin, line, "extends"
        ))
    if len(chain) >= MAX_EXTENDS:
        raise PolicyError(Problem(f"extends chain longer than {MAX_EXTENDS}", origin, line, "extends"))
    name, text, parent_dir, identity = _open(reference, base_dir, origin, line)
    if identity in chain:
        cycle = " -> ".join([*chain[chain.index(identity):], identity])
        raise PolicyError(Problem(f"extends cycle: {cycle}", origin, line, "extends"))
    base = resolve_extends(parse_policy_yaml(text, name), parent_dir, chain + (identity,))
    merged = merge_policy_data(base.data, data)
    description = _inherited_description(name, data)
    if description is not None:
        merged["description"] = description
    layers = (doc.origin, *(base.layers or (base.origin,)))
    return PolicyData(merged, doc.origin, _merged_marks(merged, base.marks, doc.marks), layers)


# ----------------------------------------------------------------- validation
def validate_policy_data(doc: PolicyData) -> Policy:
    """Build a :class:`Policy`; every validation error becomes a :class:`Problem` with its line."""
    try:
        return Policy.model_validate(doc.data)
    except ValidationError as err:
        raise PolicyError(problems_from_validation(err, doc.data, doc.marks, doc.origin, layers=doc.layers)) from None


def validate_mapping(data: Any, origin: str = "<dict>") -> Policy:
    """Build a :class:`Policy` from parsed data (``extends`` resolved against the working directory)."""
    if not isinstance(data, dict):
        raise PolicyError(Problem(f"a policy is a mapping of fields, got {_kind(data)}", origin))
    return validate_policy_data(resolve_extends(PolicyData(data, origin, _marks_of(data, origin)), None, ()))


def loads_policy(text: str, origin: str = "<text>", base_dir: str | Path | None = None) -> Policy:
    """A :class:`Policy` from YAML text; a relative ``extends`` is looked up in ``base_dir`` (default: cwd)."""
    doc = parse_policy_yaml(text, origin)
    return validate_policy_data(resolve_extends(doc, Path(base_dir) if base_dir is not None else None, (origin,)))


def _looks_like_yaml(text: str) -> bool:
    """A one-line string that reads as a YAML mapping (``name: x``, ``{decode: ...}``)."""
    return text.lstrip().startswith("{") or re.search(r"\w:(\s|$)", text) is not None


def load_policy(source: PolicySource) -> Policy:
    """Return a validated, frozen :class:`Policy` from a Policy, a mapping, YAML text, a path or a built-in name.

    A string that spans several lines is YAML text (``extends`` relative to the working directory), as
    :func:`loads_policy` reads it: no file or policy name holds a line break. Any other string is a path if
    such a file exists, else a built-in name (``moment`` or ``moment.yaml``); a one-line string that is
    neither but reads as YAML gets an error saying how to pass YAML text.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, dict):
        return validate_mapping(source, "<dict>")
    if isinstance(source, str) and ("\n" in source or "\r" in source):
        return loads_policy(source, "<text>")
    if isinstance(source, (str, Path)):
        reference = str(source)
        if isinstance(source, str) and not _is_file(Path(reference)) and _builtin_name(reference) is None \
                and _looks_like_yaml(reference):
            raise PolicyError(Problem(
                f"{reference[:60]!r} is neither a policy file nor a built-in policy; it reads as YAML, but YAML "
                "text is taken only when it spans several lines: write one field per line, or call "
                "momentkv.policy.loads_policy(text)", "<text>",
            ))
        name, text, parent_dir, identity = _open(reference, None, reference, None)
        doc = parse_policy_yaml(text, name)
        return validate_policy_data(resolve_extends(doc, parent_dir, (identity,)))
    raise PolicyError(
        f"a policy is a built-in name, a path, YAML text, a dict or a Policy, got {type(source).__name__}"
    )

