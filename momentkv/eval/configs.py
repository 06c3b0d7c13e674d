"""What is evaluated: each policy at each budget, as one :class:`EvalConfig`.

A budget is either a *decode* budget (generated tokens kept per layer and KV head, the policy's own meaning)
or a *total* budget: KV tokens in all, prompt included, so that policies that keep the prompt and policies
that evict from the whole cache are compared at equal memory. At a total budget ``T`` a whole-cache policy
(``scope: all``) gets ``budget = T``; a prompt-intact policy gets ``budget = T - prompt length`` for each
prompt, so it is one policy per prompt and each prompt is decoded alone (the engine gives every row of a
batch the same budget). A policy that compresses the prompt (a prefill compressor) has no single total and
is refused at total budgets.

A budget given on the command line replaces the policy's ``decode.budget``. The policy's protected
``recent`` window and ``sinks`` are scaled by the same factor (rounded, at least 1 if they were set), so each
policy keeps its shape at every budget: H2O's recent window stays half its budget, SCOPE's a quarter.
Without that, a recent window larger than a small budget would be rejected, and one equal to the budget
would turn H2O into a plain recency window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from momentkv.errors import PolicyError
from momentkv.policy import Policy, load_policy


MEMORY_KINDS = ("decode", "total")


@dataclass(frozen=True)
class EvalConfig:
    label: str  # unique name in reports, e.g. "moment@64" or "moment@T512"
    name: str  # the policy's name
    budget: int | None  # decode budget in tokens, or the total budget when memory == "total" (None: the full cache)
    policy: Policy | None  # the policy (total budget: before its per-prompt budgets; None: a peer toolkit's pass)
    memory: str = "decode"  # what `budget` counts: "decode" (generated tokens) or "total" (prompt + generated)
    prompt_policies: tuple[Policy, ...] | None = None  # one policy per prompt (prompt-intact at a total budget)

    def policy_for(self, batch) -> Policy:
        """The policy that runs ``batch`` (a :class:`~momentkv.eval.batches.Batch`)."""
        if self.prompt_policies is None:
            return self.policy
        chosen = [self.prompt_policies[row] for row in batch.rows]
        if any(p is not chosen[0] and p != chosen[0] for p in chosen):
            raise ValueError(f"{self.label}: the prompts of one batch need one policy; decode them one at a time")
        return chosen[0]

    @property
    def runnable(self):
        """What the passes take: the policy, or a function of the batch for per-prompt policies."""
        return self.policy if self.prompt_policies is None else self.policy_for


def _scaled(value, factor: float):
    if isinstance(value, dict):  # {fraction: f} of the budget: already follows it
        return value
    return 0 if value == 0 else max(1, round(value * factor))


def _tokens(value, budget: int) -> int:
    """Tokens a ``sinks``/``recent`` value protects at ``budget`` (an integer, or {fraction: f} of the budget)."""
    return math.floor(round(value["fraction"] * budget, 6)) if isinstance(value, dict) else value


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
    # rounding can overshoot tiny budgets
    while _tokens(decode["sinks"], budget) + max(_tokens(decode["recent"], budget), 1) > budget:
        if isinstance(decode["recent"], int) and decode["recent"] > 1:
            decode["recent"] -= 1
        elif isinstance(decode["sinks"], int) and decode["sinks"] > 0:
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


def _keeps_prompt(policy: Policy) -> bool:
    return policy.prefill.type == "keep"


def build_total_configs(sources: list, totals: list[int], prompt_lengths: list[int],
                        prompt_ids: list[str] | None = None) -> list[EvalConfig]:
    """One config per policy and total budget ``T`` (prompt + generated KV tokens per layer and KV head).

    ``scope: all`` policies get ``budget = T``; prompt-intact ones ``budget = T - prompt_lengths[p]`` for each
    prompt ``p`` (protections scaled as :func:`with_budget` does). Policies without decode eviction are not
    repeated here. Raises :class:`PolicyError` for a total <= 0, a prompt-intact policy at a total that
    does not exceed a prompt, or a policy that compresses the prompt.
    """
    bad = [t for t in totals if t <= 0]
    if bad:
        raise PolicyError(f"total budgets must be positive numbers of tokens, got {', '.join(map(str, bad))}")
    ids = prompt_ids or [f"#{i}" for i in range(len(prompt_lengths))]
    configs: list[EvalConfig] = []
    for source in sources:
        policy = load_policy(source)
        name = policy_label(source, policy)
        if policy.decode is None:
            continue
        if not _keeps_prompt(policy):
            raise PolicyError(f"{name} compresses the prompt ({policy.prefill.type}): a total budget needs a "
                              "prompt-intact policy or a whole-cache one (decode.scope: all)")
        for total in totals:
            label = f"{name}@T{total}"
            if policy.decode.scope == "all":
                configs.append(EvalConfig(label=label, name=name, budget=total, policy=with_budget(policy, total),
                                          memory="total"))
                continue
            too_long = [(i, n) for i, n in zip(ids, prompt_lengths) if n >= total]
            if too_long:
                longest = max(too_long, key=lambda x: x[1])
                raise PolicyError(f"total budget {total} leaves no room for generated tokens after prompt "
                                  f"{longest[0]!r} ({longest[1]} tokens) under the prompt-intact policy {name}; "
                                  f"use totals above {max(prompt_lengths)} or a whole-cache policy (scope: all)")
            cache: dict[int, Policy] = {}
            per_prompt = tuple(cache.setdefault(total - n, with_budget(policy, total - n)) for n in prompt_lengths)
            configs.append(EvalConfig(label=label, name=name, budget=total, policy=policy, memory="total",
                                      prompt_policies=per_prompt))
    return configs
