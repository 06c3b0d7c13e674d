"""The cache statistics of a whole evaluation run: one :class:`GenerationTally` summed over ``generate`` calls.

A handle reports only the most recent cache (``handle.stats()``); an evaluation harness calls ``generate``
once per batch of requests, so the run's totals are summed here after each call.
"""

from __future__ import annotations


class GenerationTally:
    """Totals over every ``generate`` call of a run, and whether each layer stayed within its budget.

    ``add(stats, cadences)`` takes one cache's ``stats()`` (see ``EvictingCache.stats``) and each layer's
    eviction cadence (a layer evicting every ``c`` steps may hold ``c - 1`` tokens over its budget between
    evictions). A layer's budget counts generated tokens per batch row and KV head; its stored generated
    tokens are checked against it after every call.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.sequences = 0
        self.evicted = 0
        self.max_seen = 0
        self.max_generated_stored = 0
        self.max_kv_bytes = 0
        self.budgets: set[int] = set()
        self.over_budget: list[str] = []

    def add(self, stats: dict, cadences: list[int], sequences: int) -> None:
        """Fold one cache's ``stats`` (after its ``generate`` call over ``sequences`` rows) into the totals."""
        self.calls += 1
        self.sequences += sequences
        self.evicted += stats["evicted"]
        self.max_seen = max(self.max_seen, stats["seen"])
        self.max_kv_bytes = max(self.max_kv_bytes, stats["kv_bytes"])
        for layer, cadence in zip(stats["layers"], cadences):
            self.max_generated_stored = max(self.max_generated_stored, layer["generated_stored"])
            budget = layer["budget"]
            if budget is None:
                continue
            self.budgets.add(budget)
            if layer["generated_stored"] > budget + cadence - 1:
                self.over_budget.append(
                    f"call {self.calls}, layer {layer['layer']}: {layer['generated_stored']} generated tokens "
                    f"stored, budget {budget}"
                )

    def summary(self) -> dict:
        """The totals as plain data for a results file."""
        return {
            "generate_calls": self.calls,
            "sequences": self.sequences,
            "evicted": self.evicted,
            "max_seen": self.max_seen,
            "max_generated_stored": self.max_generated_stored,
            "budgets": sorted(self.budgets),
            "budget_held": not self.over_budget,
            "over_budget": self.over_budget[:10],
            "max_kv_bytes": self.max_kv_bytes,
        }
