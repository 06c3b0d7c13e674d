"""Scorers: small components that rank cached tokens for eviction, composed as a weighted sum."""

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer, scorer_class, scorer_names
from momentkv.scoring import attention_scorers as _attention_scorers  # noqa: F401  (registers built-ins)
from momentkv.scoring import static_scorers as _static_scorers  # noqa: F401
from momentkv.scoring.attention_scorers import EMA, Accumulated, Instantaneous
from momentkv.scoring.static_scorers import KeyNorm, Recency

__all__ = [
    "ScoreContext", "Scorer", "register_scorer", "scorer_class", "scorer_names",
    "EMA", "Accumulated", "Instantaneous", "Recency", "KeyNorm",
]
