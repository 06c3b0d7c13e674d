"""Property testing for policy authors: Hypothesis strategies and invariant checks on the real cache layer.

A few lines of pytest check that a policy keeps its promises on random decode traces::

    from hypothesis import given, settings
    from momentkv import testing

    @settings(max_examples=25, deadline=None)
    @given(trace=testing.decode_traces())
    def test_my_policy(trace):
        testing.check_invariants("my_policy.yaml", trace)

What is checked (each also available alone, on a :class:`TraceRun` from :func:`run_trace`):

- :func:`check_slots`: every slot holds the key and value of the token its position names, no token twice;
- :func:`check_budget`: the evictable tokens never exceed the budget (``budget + cadence - 1`` between two
  evictions when ``cadence > 1``);
- :func:`check_protected`: the prompt (with ``scope: decode``), the ``sinks`` and the ``recent`` tokens are
  never evicted, and nothing at all is evicted from an uncompressed layer;
- :func:`check_scores`: each scorer, called alone on every step's tokens, returns finite scores shaped
  ``(batch, kv_heads, tokens)`` and modifies nothing in its context but its state; the combined scores are
  never NaN; with ``granularity: layer`` every KV head keeps the same tokens;
- :func:`check_deterministic`: two runs of the same trace give the same cache, bit for bit;
- :func:`check_matches_full_cache`: until the budget is reached, the cache equals the full cache.

Modules: :mod:`~momentkv.testing.strategies`, :mod:`~momentkv.testing.traces`, :mod:`~momentkv.testing.checks`.
The strategies: :func:`policies` (valid policies, built through the Python API, any registered scorer with
parameters drawn from its pydantic fields), :func:`invalid_policies` (policy data with one mistake, and the
field and message that the error must name), :func:`decode_traces` (keys, values and attention rows of
varying length and sharpness).

The traces drive :class:`momentkv.engine.layer.EvictingLayer` itself, the layer ``patch()`` installs: the
prompt through ``update`` and ``observe`` (so prefill compressors and ``scope: all`` see real queries), then
one ``update`` and one ``observe`` per generated token, with the attention the trace gives each stored token
and the step's query (windowed scorers recompute the attention of the last queries from them). Attention is a function of the token (not of its slot), so two policies see the same attention for the
same token, as they would in a model.
"""

from momentkv.testing.checks import (
    check_budget, check_deterministic, check_invariants, check_matches_full_cache, check_protected, check_scores,
    check_slots,
)
from momentkv.testing.strategies import (
    InvalidPolicy, component_params, decode_policies, invalid_policies, policies, prefill_compressors, scorers,
)
from momentkv.testing.traces import DecodeTrace, StepRecord, TraceRun, decode_traces, run_trace

__all__ = [
    "DecodeTrace", "InvalidPolicy", "StepRecord", "TraceRun", "check_budget", "check_deterministic",
    "check_invariants", "check_matches_full_cache", "check_protected", "check_scores", "check_slots",
    "component_params", "decode_policies", "decode_traces", "invalid_policies", "policies", "prefill_compressors",
    "run_trace", "scorers",
]
