"""The policy language: schema, loading (with ``extends``), dumping and the built-in policies."""

from momentkv.policy.dump import dump_policy, dump_policy_data, policy_to_data, summarize
from momentkv.policy.loader import (
    builtin_policy_names, load_policy, loads_policy, merge_policy_data, validate_mapping,
)
from momentkv.policy.schema import BudgetFraction, DecodePolicy, Policy, RatioBudget

__all__ = [
    "BudgetFraction", "DecodePolicy", "Policy", "RatioBudget", "builtin_policy_names", "dump_policy",
    "dump_policy_data", "load_policy", "loads_policy", "merge_policy_data", "policy_to_data", "summarize",
    "validate_mapping",
]
