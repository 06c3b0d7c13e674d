"""The scorer registry: the names the policy language knows, and ``register_scorer`` to add one.

Third-party packages register scorers without an import by the user through the entry-point group
``momentkv.scorers`` (``name = "package.module:ScorerClass"``); those load the first time a name is looked up.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Literal

from pydantic import create_model

from momentkv.scoring.base import Scorer

ENTRY_POINT_GROUP = "momentkv.scorers"
_SCORERS: dict[str, type[Scorer]] = {}
_entry_points_loaded = False


def register_scorer(name: str):
    """Class decorator: make ``cls`` (a :class:`Scorer` subclass) available to policies as ``type: name``.

    The returned class is a subclass of ``cls`` whose ``type`` field is fixed to ``name``, so
    ``MyScorer(alpha=0.5)`` in Python and ``{type: name, alpha: 0.5}`` in YAML build equal objects.
    """
    if not name.isidentifier():
        raise ValueError(f"scorer name must be an identifier, got {name!r}")

    def decorate(cls: type[Scorer]) -> type[Scorer]:
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"@register_scorer({name!r}) needs a subclass of momentkv.Scorer, got {cls!r}")
        if name in _SCORERS and _SCORERS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"a scorer named {name!r} is already registered ({_SCORERS[name].__qualname__})")
        registered = create_model(
            cls.__name__,
            __base__=cls,
            __module__=cls.__module__,
            __doc__=cls.__doc__,
            type=(Literal[name], name),
        )
        registered.__qualname__ = cls.__qualname__
        _SCORERS[name] = registered
        return registered

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _SCORERS:
            entry.load()  # the module's @register_scorer does the registering


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class registered as ``name``; ``KeyError`` if none is."""
    if name not in _SCORERS:
        _load_entry_points()
    return _SCORERS[name]


def scorer_names() -> list[str]:
    """Names of all registered scorers, sorted."""
    _load_entry_points()
    return sorted(_SCORERS)
