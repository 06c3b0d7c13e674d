"""The scorer registry: the names the policy language knows, and ``register_scorer`` to add one.

One :class:`~momentkv.registry.ComponentRegistry` (the rules every component kind shares: identifier names,
no two classes under one name, strict validation, entry points). Third-party packages register scorers
without an import by the user through the entry-point group ``momentkv.scorers``
(``name = "package.module:ScorerClass"``); those load the first time a name is looked up.
"""

from __future__ import annotations

from momentkv.registry import ComponentRegistry
from momentkv.scoring.base import Scorer

ENTRY_POINT_GROUP = "momentkv.scorers"
#: Every scorer returns its scores from ``update`` (the base's raises NotImplementedError).
SCORERS = ComponentRegistry(Scorer, "scorer", ENTRY_POINT_GROUP, required=lambda cls: ("update",))

#: Class decorator: make a :class:`Scorer` subclass available to policies as ``type: name``.
register_scorer = SCORERS.register
#: The scorer class registered as ``name``; ``KeyError`` if none is.
scorer_class = SCORERS.get
#: Names of all registered scorers (installed plugins included), sorted.
scorer_names = SCORERS.names
