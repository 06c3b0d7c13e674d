"""Loading a policy from a built-in name, a YAML path, a mapping or a :class:`Policy`.

YAML is read with a safe loader that builds no Python objects and rejects duplicate keys; every problem is
reported as a :class:`momentkv.PolicyError` naming the file, the line and the field path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from momentkv.errors import PolicyError
from momentkv.policy.schema import Policy

PolicySource = Policy | dict | str | Path


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"unhashable mapping key {key!r}", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def builtin_policy_dir():
    """The folder of built-in policies (installed as the package ``momentkv.policies``)."""
    return resources.files("momentkv.policies")


def builtin_policy_names() -> list[str]:
    """Names of the built-in policies, e.g. ``moment.yaml``."""
    return sorted(p.name for p in builtin_policy_dir().iterdir() if p.name.endswith(".yaml"))


def _resolve_path(source: str | Path) -> tuple[str, str]:
    """Return ``(display name, YAML text)`` for a path or a built-in name (with or without ``.yaml``)."""
    path = Path(source)
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    name = path.name if path.name.endswith(".yaml") else f"{path.name}.yaml"
    if str(path.parent) in ("", ".") and name in builtin_policy_names():
        return name, builtin_policy_dir().joinpath(name).read_text(encoding="utf-8")
    raise PolicyError(
        f"{source}: no such policy file, and not a built-in policy; built-ins: {', '.join(builtin_policy_names())}"
    )


def parse_yaml(text: str, origin: str) -> Any:
    """Parse YAML text safely; syntax errors and duplicate keys raise :class:`PolicyError` with the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{origin}{line}: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise PolicyError(f"{origin}: {err}") from None


def _format_location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(policy)"


def validate_mapping(data: Any, origin: str) -> Policy:
    """Build a :class:`Policy` from parsed data; all validation errors become one :class:`PolicyError`."""
    if not isinstance(data, dict):
        raise PolicyError(f"{origin}: a policy is a mapping of fields, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "RatioBudget"})))
            problems.append(f"{origin} {_format_location(loc)}: {e['msg']}")
        raise PolicyError(problems) from None


def load_policy(source: PolicySource) -> Policy:
    """Return a validated, frozen :class:`Policy` from a Policy, a mapping, a path or a built-in name."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, dict):
        return validate_mapping(source, "<dict>")
    if isinstance(source, (str, Path)):
        origin, text = _resolve_path(source)
        return validate_mapping(parse_yaml(text, origin), origin)
    raise PolicyError(f"a policy is a built-in name, a path, a dict or a Policy, got {type(source).__name__}")
