"""Bridges from momentkv to other tools; each module here imports its tool, so nothing here is imported by
``import momentkv``.

- ``lm_eval_model``: the ``momentkv`` model of lm-evaluation-harness (needs ``momentkv[lm-eval]``).
- ``lm_eval_args``: momentkv's own model arguments, checked without importing lm-evaluation-harness.
- ``generation_tally``: the cache statistics of many ``generate`` calls, summed.
- ``tasks``: offline lm-evaluation-harness tasks whose long answers exercise eviction.
"""
