"""The search space of ``momentkv tune``, read from YAML, and the policy a trial's choices make.

The file has two sections (the default is ``default_space.yaml`` beside this module)::

    decode:                      # recent_fraction, sinks, cadence, granularity, scope
      recent_fraction: {low: 0.0, high: 0.5}
    scorers:                     # scorer type -> use, weight, normalize and its own parameters
      ema: {use: true, alpha: {low: 0.5, high: 0.99}}

Each value is fixed (a scalar), a choice (a list) or a range (``{low, high, log}``; integers when both
bounds are integers). Every problem in the file is reported at once, as a :class:`PolicyError` naming the
path (``scorers.ema.alpha: ...``); scorer names and parameters are checked against the scorer registry, so
a scorer registered by a plugin can be searched like a built-in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from momentkv.errors import PolicyError

DECODE_KEYS = ("recent_fraction", "sinks", "cadence", "granularity", "scope")
SCORER_KEYS = ("use", "weight", "normalize")


class SearchSpaceError(PolicyError):
    """A search-space file that is missing or malformed; the message lists every problem with its path."""


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) value: ``kind`` is ``fixed``, ``choice``, ``int`` or ``float``."""

    name: str  # the Optuna parameter name, e.g. "scorers.ema.alpha"
    kind: str
    value: Any = None  # fixed value, or the list of choices
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial):
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.value)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def _param(name: str, spec: Any, problems: list[str]) -> Param | None:
    if isinstance(spec, list):
        if not spec:
            problems.append(f"{name}: a choice needs at least one value")
            return None
        return Param(name, "choice", value=spec)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"low", "high", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            problems.append(f"{name}: a range is {{low, high}} with an optional log: true"
                            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            return None
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high))
        if not numbers or not isinstance(log, bool):
            problems.append(f"{name}: low and high must be numbers, log true or false")
            return None
        if low > high or (log and low <= 0):
            problems.append(f"{name}: needs low <= high{' and low > 0 on a log scale' if log else ''}, "
                            f"got {low}, {high}")
            return None
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return Param(name, kind, low=low, high=high, log=log)
    return Param(name, "fixed", value=spec)


@dataclass(frozen=True)
class ScorerSpace:
    type: str
    use: Param
    params: tuple[Param, ...]  # weight, normalize and the scorer's own fields


@dataclass(frozen=True)
class SearchSpace:
    """A parsed search space; :meth:`policy` turns a trial's choices into a policy mapping."""

    decode: tuple[Param, ...]
    scorers: tuple[ScorerSpace, ...]
    source: str

    def policy(self, trial, budget: int, name: str = "tuned") -> dict:
        """The policy mapping of ``trial``'s choices at peak memory ``budget`` (decode tokens, or the whole
        cache with ``scope: all``): a cadence ``c`` holds up to ``decode.budget + c - 1`` tokens between
        evictions, so the policy's ``decode.budget`` is ``budget - (c - 1)`` and every trial holds at most
        ``budget`` tokens. Raises :class:`PolicyError` when no scorer is used or the cadence leaves no budget."""
        values = {p.name.split(".", 1)[1]: p.suggest(trial) for p in self.decode}
        cadence = values.get("cadence", 1)
        budget = held_budget(budget, cadence)
        scorers = []
        for scorer in self.scorers:
            if not scorer.use.suggest(trial):
                continue
            entry = {"type": scorer.type}
            entry.update({p.name.rsplit(".", 1)[1]: p.suggest(trial) for p in scorer.params})
            scorers.append(entry)
        if not scorers:
            raise PolicyError("the trial chose no scorer")
        decode = {"budget": budget, "scorers": scorers}
        fraction = values.pop("recent_fraction", 0.0)
        decode["recent"] = int(round(fraction * budget))
        decode.update(values)
        return {"name": name, "decode": decode}


def held_budget(peak: int, cadence) -> int:
    """The decode budget that holds at most ``peak`` tokens at ``cadence`` (``peak - (cadence - 1)``)."""
    held = peak - (cadence - 1) if isinstance(cadence, int) and not isinstance(cadence, bool) else peak
    if held < 1:
        raise PolicyError(f"cadence {cadence} holds up to {cadence - 1} tokens beyond the budget between "
                          f"evictions, which leaves no budget within {peak} tokens")
    return held


def default_space_path():
    return resources.files("momentkv.tune").joinpath("default_space.yaml")


def load_space(path=None) -> SearchSpace:
    """Read and check a search-space file (the default one when ``path`` is None)."""
    from momentkv.scoring import scorer_class, scorer_names

    if path is not None and not Path(path).is_file():
        raise SearchSpaceError(f"{path}: no such search-space file")
    source = "default search space" if path is None else str(path)
    text = (default_space_path() if path is None else Path(path)).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"{source}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or set(data) - {"decode", "scorers"} or not data.get("scorers"):
        raise SearchSpaceError(f"{source}: needs a 'scorers' mapping (and optionally 'decode'), nothing else")
    problems: list[str] = []
    decode = []
    for key, spec in (data.get("decode") or {}).items():
        if key not in DECODE_KEYS:
            problems.append(f"decode.{key}: unknown; known: {', '.join(DECODE_KEYS)}")
            continue
        param = _param(f"decode.{key}", spec, problems)
        if param is not None:
            decode.append(param)
    scorers = []
    if not isinstance(data["scorers"], dict):
        raise SearchSpaceError(f"{source}: 'scorers' maps scorer types to their settings")
    for kind, spec in data["scorers"].items():
        spec = spec or {}
        try:
            cls = scorer_class(kind)
        except KeyError:
            problems.append(f"scorers.{kind}: unknown scorer; known: {', '.join(scorer_names())}")
            continue
        fields = set(cls.model_fields) - {"type"}
        params = []
        for key, value in spec.items():
            if key != "use" and key not in fields:
                problems.append(f"scorers.{kind}.{key}: not a field of {kind}; fields: {', '.join(sorted(fields))}")
                continue
            param = _param(f"scorers.{kind}.{key}", value, problems)
            if param is not None and key != "use":
                params.append(param)
        use = _param(f"scorers.{kind}.use", spec.get("use", True), problems)
        if use is not None and not all(isinstance(v, bool) for v in (use.value if use.kind == "choice" else [use.value])):
            problems.append(f"scorers.{kind}.use: true, false or a list of them")
        scorers.append(ScorerSpace(kind, use, tuple(params)))
    if problems:
        raise SearchSpaceError(f"{source}: " + "; ".join(problems))
    return SearchSpace(decode=tuple(decode), scorers=tuple(scorers), source=source)
