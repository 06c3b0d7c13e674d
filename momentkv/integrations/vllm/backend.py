"""vLLM's CPU attention backend with momentkv's decode eviction (registered by the plugin when a policy is set).

Each request keeps its context whole and at most ``budget`` generated tokens per layer and KV head. A request
with context ``P`` lays its tokens out in its blocks at *physical* indices: the context at ``0 .. P-1``, the
generated tokens at ``P .. P+budget-1`` (slot of index ``i`` = ``block_table[i // block_size] * block_size +
i % block_size``, the engine's own mapping). Until the budget is full a generated token goes where vLLM
would put it; from then on each KV head writes it into the slot of that head's lowest-ranked generated token
(:class:`momentkv.core.eviction.LayerEviction`). Every head of a request therefore holds
``P + min(generated, budget)`` tokens: the metadata builder gives the attention kernel that ``seq_len``, and
the request's blocks are capped at what those indices need (:mod:`momentkv.integrations.vllm.blocks`).
Positions (RoPE) stay absolute: the runner computes them.

The builder turns the step's decode rows into index tensors once per step
(:class:`momentkv.integrations.vllm.rows.DecodeBatch`); each layer then ranks the full rows' generated slots
in one call into the core, writes every row's new token with one indexed store, and folds this step's
attention into the scorer states of all rows holding the same number of tokens at once.

Scorer states, and each slot's sequence index, live in pools addressed by slot index
(:class:`momentkv.core.paged.PagedStates`), so they follow a request through continuous batching without a
request id. The context length of a request is recorded, keyed by the first block of its block table, on
every step where its row is prefilling (the last chunk of a chunked prefill leaves the full length). A
preempted request is recomputed: its prompt and every token it generated are prefilled again and all become
its context (the tokens it had evicted come back), and its scoring starts afresh.

Scorers that read this step's attention get the softmax of each row's query over its stored keys, averaged
over each KV head's query group, at the generated slots: one native call per layer reads the keys in place in
the paged cache (:mod:`momentkv.core.paged_probs`); where it cannot (no compiler, not float32) the keys are read
back block by block into one tensor and the softmax computed in torch. The keys and values of the generated
slots are gathered for the core only where a scorer reads them (``Scorer.reads_cache``). The cache's packing
(keys row-major or transposed per block, per ISA) is probed once per layer through the backend's own write op.

Once a row's budget is full, a plan whose every-step scoring is one closed computation folds through the fused
step (:meth:`LayerEviction.fold` with per-row ``now`` and context length: natively on the CPU), which also names
each head's victim for the next token; the impl keeps it beside the row's first generated slot, stamped with
the fold's sequence index, and the next write takes it without ranking again (any row whose last fold was not
such a step is ranked by the core as before).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import vllm._custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from momentkv.core.eviction import LayerEviction
from momentkv.core.group_attention import group_attention
from momentkv.core.paged import PagedStates
from momentkv.core.paged_probs import PagedProbs
from momentkv.core.plan import build_plans
from momentkv.errors import PolicyError
from momentkv.integrations.vllm import check, policy_source
from momentkv.integrations.vllm.rows import DecodeBatch
from momentkv.scoring.base import ScoreContext

logger = init_logger("vllm.momentkv")  # under vLLM's logger, which prints


class _Runtime:
    """The policy of this process, resolved once per model."""

    def __init__(self, vllm_config):
        source = policy_source(vllm_config.additional_config)
        self.policy = check(source, vllm_config)
        text = getattr(vllm_config.model_config, "hf_text_config", vllm_config.model_config.hf_config)
        self.num_layers = int(text.num_hidden_layers)
        self.plans = build_plans(self.policy, self.num_layers, [None] * self.num_layers)
        self.budget = self.plans[0].budget
        # Rows of different lengths share one call into the core when every scorer takes a per-row `now`.
        self.batched = all(s.batched_now for plan in self.plans for s in plan.scorers)
        self.needs_attention = any(plan.needs_step_attention for plan in self.plans)
        self.reads_cache = any(s.reads_cache for plan in self.plans for s in plan.scorers)
        logger.info("momentkv: policy %s, %d generated tokens per layer and KV head",
                    self.policy.name or json.dumps(source), self.budget)


_RUNTIME: _Runtime | None = None


def runtime(vllm_config=None) -> _Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _Runtime(vllm_config if vllm_config is not None else get_current_vllm_config())
    return _RUNTIME


@dataclasses.dataclass
class MomentKVMetadata(CPUAttentionMetadata):
    decode: DecodeBatch | None = None


class MomentKVMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock builder, with each decode row's ``seq_len`` set to its physical length."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        runtime(self.vllm_config)
        self.prompts: dict[int, int] = {}  # first block of a request -> its prompt length

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        rt = runtime()
        budget = rt.budget
        n = cm.num_reqs
        seq = cm.seq_lens[:n].to("cpu")
        starts = cm.query_start_loc_cpu[: n + 1]
        qlen = starts[1:] - starts[:-1]
        prefilling = cm.is_prefilling
        table = cm.block_table_tensor
        new_seq = cm.seq_lens.clone()
        rows, tokens, prompts, generated = [], [], [], []
        for r in range(n):
            first, length = int(table[r, 0]), int(seq[r])
            if (bool(prefilling[r]) if prefilling is not None else int(qlen[r]) > 1) or int(qlen[r]) != 1:
                self.prompts[first] = length
                continue
            prompt = self.prompts.get(first)
            if prompt is None:
                if first == 0:  # the null block: a dummy run, left to the stock path
                    continue
                # Its blocks are capped (blocks.py): the stock write would land outside them.
                raise RuntimeError(f"momentkv: a decode row (first block {first}) whose prefill was never seen")
            g = length - 1 - prompt
            new_seq[r] = prompt + min(g + 1, budget)
            rows.append(r)
            tokens.append(int(starts[r]))
            prompts.append(prompt)
            generated.append(g)
        cm = dataclasses.replace(cm, seq_lens=new_seq)
        meta = super().build(common_prefix_len, cm, fast_build)
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        decode = None
        if rows:
            decode = DecodeBatch.make(tokens, prompts, generated, table[rows], budget, self.block_size, rt.batched,
                                      rt.needs_attention)
        return MomentKVMetadata(**fields, decode=decode)


class MomentKVImpl(CPUAttentionBackendImpl):
    """The stock impl; decode rows are written into their victim slots and folded into the scorers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rt = runtime()
        self.core: LayerEviction | None = None

    # ------------------------------------------------------------ per-layer state, made on first use
    def _start(self, layer, kv_cache: torch.Tensor) -> None:
        idx = extract_layer_index(layer.layer_name)
        self.plan = self.rt.plans[idx]
        self.core = LayerEviction(self.plan)
        blocks, heads, self.block_size, _ = kv_cache.shape
        slots = blocks * self.block_size
        self.heads = torch.arange(heads)
        self.positions = torch.zeros(slots, heads, dtype=torch.long)
        self.states = PagedStates([s.state_channels for s in self.plan.scorers], slots, heads)
        # What a steady fold named for the next token (the fused step ranks as it folds), keyed by the request's
        # first generated slot, with the sequence index of the fold that named it (-1: nothing named).
        self.named = torch.zeros(slots, heads, dtype=torch.long)
        self.named_at = torch.full((slots,), -1, dtype=torch.long)
        self.keys_transposed = _probe_packing(layer.isa, heads, self.head_size, self.block_size, kv_cache.dtype)
        self.paged_probs = PagedProbs(self.block_size, self.head_size, self.keys_transposed)

    def _split(self, kv_cache: torch.Tensor):
        """Keys and values of ``kv_cache`` ``[blocks, kv_heads, block_size, 2 * head_size]`` as views:
        keys ``(blocks, kv_heads, head_size, block_size)`` where the ISA stores them transposed, else
        ``(blocks, kv_heads, block_size, head_size)``; values ``(blocks, kv_heads, block_size, head_size)``."""
        blocks, heads, bs, _ = kv_cache.shape
        halves = kv_cache.view(blocks, heads, 2, bs * self.head_size)
        keys = halves[:, :, 0].view(blocks, heads, *((self.head_size, bs) if self.keys_transposed else
                                                     (bs, self.head_size)))
        return keys, halves[:, :, 1].view(blocks, heads, bs, self.head_size)

    def _read(self, kv_cache, slots: torch.Tensor):
        """Keys and values ``(n, kv_heads, S, head_size)`` stored at ``slots`` ``(n, S)``, through :meth:`_split`'s
        views."""
        keys, values = self._split(kv_cache)
        bs = self.block_size
        blocks, offsets = (slots // bs).unsqueeze(1), (slots % bs).unsqueeze(1)  # (n, 1, S)
        heads = self.heads.view(1, -1, 1)
        k = keys[blocks, heads, :, offsets] if self.keys_transposed else keys[blocks, heads, offsets]
        return k, values[blocks, heads, offsets]

    def _stored_keys(self, kv_cache, blocks: torch.Tensor) -> torch.Tensor:
        """The keys of whole blocks ``blocks`` ``(n, m)`` of each row, ``(n, kv_heads, m * block_size, head_size)``
        in physical order (a transposed view where the ISA stores keys transposed): one copy of each block's
        keys, then one permutation."""
        nb, heads, bs, _ = kv_cache.shape
        n, m = blocks.shape
        d = self.head_size
        tiles = kv_cache.view(nb, heads, 2, bs * d)[:, :, 0].index_select(0, blocks.reshape(-1))  # (n*m, H, bs*d)
        if self.keys_transposed:
            return tiles.view(n, m, heads, d, bs).permute(0, 2, 3, 1, 4).reshape(n, heads, d, m * bs).transpose(2, 3)
        return tiles.view(n, m, heads, bs, d).permute(0, 2, 1, 3, 4).reshape(n, heads, m * bs, d)

    def _view(self, kv_cache, table: torch.Tensor, now, cache: bool = True) -> ScoreContext:
        """The core's view of the generated slots ``table`` ``(n, T)``, the newest token at ``now``; their keys and
        values only with ``cache`` and where a scorer reads them."""
        k = v = None
        if cache and self.rt.reads_cache:
            k, v = self._read(kv_cache, table)
        positions = self.positions.view(-1).take(self.states.flat_index(table))  # (n, H, T), contiguous
        return ScoreContext(None, k, None, positions=positions, values=v, now=now,
                            layer_idx=self.plan.layer_idx, num_layers=self.plan.num_layers)

    # ------------------------------------------------------------ the step
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:
            return output
        n = attn_metadata.num_actual_tokens
        batch: DecodeBatch | None = getattr(attn_metadata, "decode", None)
        if batch is None:
            self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, attn_metadata.slot_mapping[:n])
        else:
            stock = torch.ones(n, dtype=torch.bool)
            stock[batch.tokens] = False
            if bool(stock.any()):
                self.do_kv_cache_update(layer, key[:n][stock], value[:n][stock], kv_cache,
                                        attn_metadata.slot_mapping[:n][stock])
            if self.core is None:
                self._start(layer, kv_cache)
            self._write(batch, key, value, kv_cache)
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if batch is not None:
            self._fold(batch, query, kv_cache)
        return output

    def _write(self, batch: DecodeBatch, key, value, kv_cache) -> None:
        """Write each row's new token: into its next generated slot, or each head's victim once full."""
        rows, heads = len(batch.tokens), len(self.heads)
        where = batch.next_slot.unsqueeze(1).repeat(1, heads)  # (R, H)
        if batch.fresh is not None:
            self.states.reset(batch.fresh)
        for group in batch.victims:
            slots = group.table.gather(1, self._victims(group, kv_cache))  # (n, H)
            self.states.reset_heads(slots)
            where[group.rows] = slots
        keys, values = self._split(kv_cache)
        bs = self.block_size
        blocks, offsets = where // bs, where % bs  # (R, H)
        head = self.heads.expand(rows, heads)
        new_keys, new_values = key[batch.tokens].to(keys.dtype), value[batch.tokens].to(values.dtype)  # (R, H, D)
        if self.keys_transposed:
            keys[blocks, head, :, offsets] = new_keys
        else:
            keys[blocks, head, offsets] = new_keys
        values[blocks, head, offsets] = new_values
        self.positions[where, head] = batch.now.unsqueeze(1)

    def _victims(self, group, kv_cache) -> torch.Tensor:
        """``(n, H)``: each head's victim among the group's generated slots: the one its last fold named where
        every row's last fold was a steady one that already ranked, else ranked by the core now."""
        first = group.table[:, 0]
        if bool((self.named_at[first] == torch.as_tensor(group.newest).reshape(-1)).all()):
            return self.named[first]
        scoring = self.core.scoring
        view = self._view(kv_cache, group.table, group.newest, cache=bool(scoring.at_rank))
        if scoring.at_rank:  # scorers that run when ranking: they read and update their states
            self.states.load(scoring, group.table)
            victim = self.core.lowest(view, group.prompt)  # (n, H, 1)
            self.states.store(scoring, group.table)
        else:  # the ranking reads the last step's combined score alone
            scoring.states, scoring.step_total = [], self.states.totals(group.table)
            victim = self.core.lowest(view, group.prompt)
        return victim[:, :, 0]

    def _fold(self, batch: DecodeBatch, query, kv_cache) -> None:
        """Fold this step's attention into the rows' scorer states (``fold`` of the core), and record the victim a
        steady fold names for the next write (:meth:`_victims`)."""
        scoring = self.core.scoring
        for group in batch.folds:
            attention = None
            if self.plan.needs_step_attention:
                attention = self._attention(group, query, kv_cache)
            self.states.load(scoring, group.table)
            view = self._view(kv_cache, group.table, group.now)
            steady = group.held == self.rt.budget and self.core.spec is not None
            self.core.fold(attention, view, group.prompt if steady else None)
            self.states.store(scoring, group.table)
            victim = self.core.named_victim(view) if steady else None
            first = group.table[:, 0]
            if victim is None:
                self.named_at[first] = -1
            else:
                self.named[first] = victim[:, :, 0]
                self.named_at[first] = torch.as_tensor(group.now).reshape(-1)

    def _attention(self, group, query, kv_cache) -> torch.Tensor:
        """This step's attention ``(n, kv_heads, held)`` of the group's queries at their generated slots, averaged
        over each KV head's query group: read in place by the native function where it takes these tensors,
        else from a gathered copy of the rows' stored keys."""
        first = group.generated[:, 0, 0]  # (n,) the physical index of the first generated slot
        probs = self.paged_probs(kv_cache, query, group.tokens, group.blocks, first + group.held, first, group.held,
                                 self.scale)
        if probs is not None:
            return probs
        stored = self._stored_keys(kv_cache, group.blocks)  # (n, H, S, D)
        q = query[group.tokens].unsqueeze(2)  # (n, heads, 1, D)
        probs = group_attention(q, stored, group.mask, self.scale)  # (n, H, S)
        return probs.gather(-1, group.generated.expand(-1, probs.shape[1], -1))  # (n, H, held)


def _probe_packing(isa: str, heads: int, head_size: int, block_size: int, dtype) -> bool:
    """Whether this ISA stores keys transposed per (block, KV head); values must be row-major. Checked by a
    write through the backend's op into a scratch block, one KV head at a time as the backend writes."""
    layer = torch.zeros(2, heads, block_size, 2 * head_size, dtype=dtype)
    kc, vc = layer.view(2, heads, 2 * block_size, head_size).chunk(2, dim=2)
    key = torch.randn(1, heads, head_size).to(dtype)
    value = torch.randn(1, heads, head_size).to(dtype)
    slot = block_size + 3
    for h in range(heads):
        ops.cpu_attn_reshape_and_cache(key[:, h : h + 1], value[:, h : h + 1], kc[:, h : h + 1], vc[:, h : h + 1],
                                       torch.tensor([slot]), isa)
    if not torch.equal(vc[1, :, 3], value[0]):
        raise PolicyError(f"momentkv's vLLM backend cannot read values packed by the CPU attention ISA {isa!r}")
    if torch.equal(kc[1].reshape(heads, head_size, block_size)[:, :, 3], key[0]):
        return True
    if torch.equal(kc[1, :, 3], key[0]):
        return False
    raise PolicyError(f"momentkv's vLLM backend cannot read keys packed by the CPU attention ISA {isa!r}")


class MomentKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with momentkv's eviction; it writes the KV cache itself (victim slots)."""

    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_impl_cls():
        return MomentKVImpl

    @staticmethod
    def get_builder_cls():
        return MomentKVMetadataBuilder
