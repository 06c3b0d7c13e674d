"""Scorers: small components that rank cached tokens for eviction, composed as a weighted sum."""

from momentkv.scoring.base import ScoreContext, Scorer
from momentkv.scoring.registry import register_scorer, scorer_class, scorer_names
from momentkv.scoring import attention_scorers as _attention_scorers  # noqa: F401  (registers built-ins)
from momentkv.scoring import static_scorers as _static_scorers  # noqa: F401
from momentkv.scoring import keydiff as _keydiff  # noqa: F401
from momentkv.scoring import last_hit as _last_hit  # noqa: F401
from momentkv.scoring import redundancy as _redundancy  # noqa: F401
from momentkv.scoring.attention_scorers import EMA, Accumulated, Instantaneous, Peak
from momentkv.scoring.keydiff import KeyDiff
from momentkv.scoring.last_hit import LastHit
from momentkv.scoring.observation import AttentionObservation
from momentkv.scoring.redundancy import Redundancy
from momentkv.scoring.static_scorers import KeyNorm, Recency

__all__ = [
    "ScoreContext", "Scorer", "register_scorer", "scorer_class", "scorer_names",
    "AttentionObservation", "EMA", "Accumulated", "Instantaneous", "Peak", "Recency", "KeyNorm", "KeyDiff",
    "LastHit", "Redundancy",
]
