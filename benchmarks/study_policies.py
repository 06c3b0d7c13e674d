"""The policies of the fidelity study (docs/results.md), as policy dicts built for a decode budget B.

``comparison``: the paper's comparison at equal decode budgets: recency (StreamingLLM's window on the
decoding cache), TOVA (current-step attention), H2O (accumulated attention + a recent window of B/2),
SCOPE-slide (current-step attention + a recent window of B/4) and Moment-KV's EMA across alpha, plain, with
the Adam-style bias correction, with a protected recent window of B/16, and with both.
``tuning``: further Moment-KV variants, ranked on the tune split only.
"""

from __future__ import annotations

ALPHAS = (0.5, 0.8, 0.9, 0.95)


def _p(name, budget, scorers, recent=0, sinks=0, **extra):
    return {"name": name, "decode": {"budget": budget, "recent": recent, "sinks": sinks, "scorers": scorers, **extra}}


def _ema(alpha, bc=False, **kw):
    return {"type": "ema", "alpha": alpha, "bias_correction": bc, **kw}


def window(budget: int, fraction: int) -> int:
    return max(1, budget // fraction)


def comparison(budget: int) -> list[dict]:
    b = budget
    out = [
        _p("recency", b, [{"type": "recency"}]),
        _p("tova", b, [{"type": "instantaneous"}]),
        _p("h2o", b, [{"type": "accumulated"}], recent=window(b, 2)),
        _p("scope", b, [{"type": "instantaneous"}], recent=window(b, 4)),
    ]
    for a in ALPHAS:
        out += [
            _p(f"ema{a}", b, [_ema(a)]),
            _p(f"ema{a}-bc", b, [_ema(a, True)]),
            _p(f"ema{a}-r", b, [_ema(a)], recent=window(b, 16)),
            _p(f"ema{a}-bc-r", b, [_ema(a, True)], recent=window(b, 16)),
        ]
    return out


def tuning(budget: int) -> list[dict]:
    b = budget
    rank = {"normalize": "rank"}
    return [
        _p("ema0.9-bc-r8", b, [_ema(0.9, True)], recent=window(b, 8)),
        _p("ema0.9-bc-r2", b, [_ema(0.9, True)], recent=window(b, 2)),  # H2O's window, EMA instead of a sum
        _p("ema0.8-bc-r4", b, [_ema(0.8, True)], recent=window(b, 4)),
        _p("ema0.99-bc-r", b, [_ema(0.99, True)], recent=window(b, 16)),
        _p("ema0.9-bc+rec0.5", b, [_ema(0.9, True, **rank), {"type": "recency", "weight": 0.5, **rank}]),
        _p("ema0.9-bc+rec1", b, [_ema(0.9, True, **rank), {"type": "recency", "weight": 1.0, **rank}]),
        _p("ema0.9+rec0.25z", b, [_ema(0.9, normalize="zscore"), {"type": "recency", "weight": 0.25,
                                                                   "normalize": "zscore"}]),
        _p("ema0.9-bc-r-layer", b, [_ema(0.9, True)], recent=window(b, 16), granularity="layer"),
        _p("ema0.95-bc-r-s4", b, [_ema(0.95, True)], recent=window(b, 16), sinks=4),
    ]
