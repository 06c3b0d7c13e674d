"""Scorers that exist only inside one test: registered on entry, gone on exit (other tests draw from the
registry, and must never meet a deliberately faulty scorer)."""

from __future__ import annotations

import contextlib

from momentkv.scoring import register_scorer
from momentkv.scoring.registry import SCORERS


@contextlib.contextmanager
def scratch_scorer(name: str, cls: type):
    """``with scratch_scorer("bad", BadScorer) as registered:`` the scorer is a policy component inside."""
    saved = dict(SCORERS._classes)
    try:
        yield register_scorer(name)(cls)
    finally:
        SCORERS._classes.clear()
        SCORERS._classes.update(saved)
