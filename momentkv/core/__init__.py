"""The eviction core: a layer's eviction decisions over plain tensors, for every engine.

No transformers and no cache class: :mod:`~momentkv.core.eviction` (how many slots go, which),
:mod:`~momentkv.core.scorer_states` (the scorers' per-slot states), :mod:`~momentkv.core.ranking`
(protections and victims), :mod:`~momentkv.core.query_window` (recent queries),
:mod:`~momentkv.core.group_attention` (the one softmax), :mod:`~momentkv.core.paged` (states addressed by slot
index, for paged engines) and :mod:`~momentkv.core.plan` (a policy resolved per layer). The transformers
cache layer (:mod:`momentkv.engine`) and the vLLM backend (:mod:`momentkv.integrations.vllm`) are adapters
over it (docs/architecture.md).
"""
