"""What is evaluated: each policy at each budget, as one :class:`EvalConfig`.

A budget given on the command line replaces the policy's ``decode.budget``. The policy's protected
``recent`` window and ``sinks`` are scaled by the same factor (rounded, at least 1 if they were set), so each
policy keeps its shape at every budget: H2O's recent window stays half its budget, SCOPE's a quarter.
Without that, a recent window larger than a small budget would be rejected, and one equal to the budget
would turn H2O into a plain recency window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from momentkv.errors import PolicyError
from momentkv.policy import Policy, load_policy


@dataclass(frozen=True)
class EvalConfig:
    label: str  # unique name in reports, e.g. "moment@64"
    name: str  # the policy's name
    budget: int | None  # decode budget in tokens (None: the full cache)
    policy: Policy


def _scaled(value: int, factor: float) -> int:
    return 0 if value == 0 else max(1, round(value * factor))


def with_budget(policy: Policy, budget: int) -> Policy:
    """``policy`` with ``decode.budget = budget`` and its protections scaled (see the module docstring)."""
    if budget <= 0:
        raise PolicyError(f"a budget must be a positive number of tokens, got {budget}")
    if policy.decode is None:
        return policy
    data = policy.model_dump(mode="json")
    decode = data["decode"]
    old = decode["budget"]
    if isinstance(old, int):
        factor = budget / old
        decode["sinks"] = _scaled(decode.get("sinks", 0), factor)
        decode["recent"] = _scaled(decode.get("recent", 0), factor)
    decode["budget"] = budget
    while decode["sinks"] + max(decode["recent"], 1) > budget:  # rounding can overshoot tiny budgets
        if decode["recent"] > 1:
            decode["recent"] -= 1
        elif decode["sinks"] > 0:
            decode["sinks"] -= 1
        else:
            break
    return load_policy(data)


def policy_label(source, policy: Policy) -> str:
    """A short name for a policy: its ``name``, else the file stem."""
    if policy.name and policy.name != "custom":
        return policy.name
    return Path(str(source)).stem if isinstance(source, (str, Path)) else "custom"


def build_configs(sources: list, budgets: list[int] | None) -> list[EvalConfig]:
    """One config per policy and budget (policies without decode eviction once, at no budget).

    Raises :class:`PolicyError` for an unknown or invalid policy, a budget <= 0, or duplicate labels.
    """
    if budgets is not None:
        bad = [b for b in budgets if b <= 0]
        if bad:
            raise PolicyError(f"budgets must be positive numbers of tokens, got {', '.join(map(str, bad))}")
    configs: list[EvalConfig] = []
    for source in sources:
        policy = load_policy(source)
        name = policy_label(source, policy)
        if policy.decode is None:
            configs.append(EvalConfig(label=name, name=name, budget=None, policy=policy))
            continue
        if budgets is None:
            budget = policy.decode.budget if isinstance(policy.decode.budget, int) else None
            configs.append(EvalConfig(label=f"{name}@{budget}" if budget else name, name=name, budget=budget,
                                      policy=policy))
            continue
        for budget in budgets:
            configs.append(EvalConfig(label=f"{name}@{budget}", name=name, budget=budget,
                                      policy=with_budget(policy, budget)))
    labels = [c.label for c in configs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise PolicyError(f"two policies share the name(s) {', '.join(dupes)}; give each policy a distinct 'name'")
    return configs
