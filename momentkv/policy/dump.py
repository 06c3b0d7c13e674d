"""From a :class:`Policy` back to YAML, and one-line summaries.

``loads_policy(dump_policy(p)) == p`` for every valid policy ``p``: the dump writes every field (defaults
included, so a dump is a complete, self-standing policy with no ``extends``), components with their
``type`` first, and lists of numbers in flow style.
"""

from __future__ import annotations

from typing import Any

import yaml

from momentkv.policy.schema import BudgetFraction, DecodePolicy, Policy, RatioBudget
from momentkv.policy.yaml12 import quote_core_schema


class _PolicyDumper(yaml.SafeDumper):
    """Safe dumper: block mappings, flow style for lists of plain numbers (budget schedules, layers)."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PolicyDumper.add_representer(list, _represent_list)
# The loader reads YAML 1.2's core schema (`1e-6` and `0o7` are numbers, `08` is refused); the dumper must know
# it too, or it would write such a string plain and the loader would read it back as something else.
quote_core_schema(_PolicyDumper)

# Characters YAML folds or normalises inside single-quoted and plain scalars (NEL, line and paragraph
# separators, carriage return, BOM): strings holding them are written double-quoted, where they are escaped.
_FOLDED = frozenset("\x85\u2028\u2029\r\ufeff")


def _represent_str(dumper: yaml.SafeDumper, data: str):
    if any(ch in _FOLDED or not ch.isprintable() and ch != "\n" for ch in data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')
    return dumper.represent_str(data)


_PolicyDumper.add_representer(str, _represent_str)


def _component(model) -> dict:
    data = model.model_dump(mode="python")
    return {"type": data.pop("type"), **data}


def policy_to_data(policy: Policy) -> dict[str, Any]:
    """The plain data (dicts, lists, scalars) that describes ``policy``; ``validate_mapping`` inverts it."""
    decode = policy.decode
    out: dict[str, Any] = {
        "name": policy.name,
        "description": policy.description,
        "prefill": _component(policy.prefill),
        "decode": None,
    }
    if decode is not None:
        out["decode"] = {
            **decode.model_dump(mode="python", exclude={"scorers"}),  # field order; models as mappings
            "scorers": [_component(s) for s in decode.scorers],
        }
    return out


def dump_policy(policy: Policy) -> str:
    """``policy`` as YAML text that loads back to an equal policy."""
    return dump_policy_data(policy_to_data(policy))


def dump_policy_data(data: Any) -> str:
    """Plain data (dicts, lists, scalars) as YAML text that the policy loader reads back as the same data."""
    return yaml.dump(data, Dumper=_PolicyDumper, sort_keys=False, allow_unicode=True, width=100)


def _describe_budget(decode: DecodePolicy) -> str:
    budget = decode.budget
    if isinstance(budget, RatioBudget):
        cap = f", cap {budget.cap}" if budget.cap is not None else ""
        return f"{budget.ratio:g} of generated (floor {budget.floor}{cap})"
    if isinstance(budget, list):
        return f"schedule {budget[0]}..{budget[-1]} over {len(budget)} points"
    return f"{budget} tokens"


def _describe_protection(value: int | BudgetFraction) -> str:
    return f"{value.fraction:g} of the budget" if isinstance(value, BudgetFraction) else str(value)


def _describe_scorer(scorer) -> str:
    """``ema(bias_correction=True)``: the parameters that differ from their defaults (and required ones)."""
    fields = type(scorer).model_fields
    params = {k: v for k, v in scorer.model_dump(exclude={"type"}).items()
              if fields[k].is_required() or v != fields[k].get_default(call_default_factory=True)}
    inner = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{scorer.type}({inner})" if inner else scorer.type


def summarize(policy: Policy) -> str:
    """One line: name, prefill, budget, protected tokens and scorers."""
    parts = [policy.name]
    if policy.prefill.type != "keep":
        parts.append(f"prefill {_describe_scorer(policy.prefill)}")
    decode = policy.decode
    if decode is None:
        parts.append("no decode eviction (full cache)")
        return "; ".join(parts)
    parts.append(f"budget {_describe_budget(decode)}")
    if decode.sinks or decode.recent:
        parts.append(f"sinks {_describe_protection(decode.sinks)}, recent {_describe_protection(decode.recent)}")
    if decode.cadence != 1:
        parts.append(f"cadence {decode.cadence}")
    if decode.granularity != "head" or decode.scope != "decode":
        parts.append(f"{decode.granularity} granularity, scope {decode.scope}")
    if decode.uncompressed_layers:
        parts.append(f"uncompressed layers {list(decode.uncompressed_layers)}")
    parts.append("scorers " + " + ".join(_describe_scorer(s) for s in decode.scorers))
    return "; ".join(parts)
