"""The policy language: schema, loading and the built-in policies."""

from momentkv.policy.loader import builtin_policy_names, load_policy
from momentkv.policy.schema import DecodePolicy, Policy, RatioBudget

__all__ = ["DecodePolicy", "Policy", "RatioBudget", "builtin_policy_names", "load_policy"]
