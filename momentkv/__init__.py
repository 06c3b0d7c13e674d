"""momentkv: a bounded KV cache for long generation with Hugging Face models.

    handle = momentkv.patch(model, "moment.yaml")
    out = model.generate(**inputs, max_new_tokens=4096)
    handle.stats(); handle.remove()
"""

from momentkv.errors import PolicyError
from momentkv.policy import DecodePolicy, Policy, RatioBudget, builtin_policy_names, load_policy
from momentkv.prefill import PrefillCompressor, register_prefill
from momentkv.scoring import ScoreContext, Scorer, register_scorer

__version__ = "0.1.0"

# The engine (transformers' seams) loads on first use: `import momentkv` and the engine-agnostic core
# (momentkv.core, the policy language, the scorers) work where transformers is absent or pinned otherwise,
# as in a serving engine's environment.
_ENGINE = ("EvictingCache", "Handle", "handle_of", "patch", "patched", "unpatch")


def __getattr__(name: str):
    if name in _ENGINE:
        from momentkv import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'momentkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENGINE))

__all__ = [
    "DecodePolicy", "EvictingCache", "Handle", "Policy", "PolicyError", "PrefillCompressor", "RatioBudget",
    "ScoreContext", "Scorer", "builtin_policy_names", "handle_of", "load_policy", "patch", "patched",
    "register_prefill", "register_scorer", "unpatch",
]
