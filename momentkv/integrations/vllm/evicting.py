"""The eviction inside a vLLM attention backend, as two mixins over a stock backend's builder and impl.

Each request keeps its context whole and at most ``budget`` generated tokens per layer and KV head. A request
with context ``P`` lays its tokens out in its blocks at *physical* indices: the context at ``0 .. P-1``, the
generated tokens at ``P .. P+budget-1`` (slot of index ``i`` = ``block_table[i // block_size] * block_size +
i % block_size``, the engine's own mapping). Until the budget is full a generated token goes where vLLM
would put it; from then on each KV head writes it into the slot of that head's lowest-ranked generated token
(:class:`momentkv.core.eviction.LayerEviction`). Every head of a request therefore holds
``P + min(generated, budget)`` tokens: the metadata builder gives the attention kernel that ``seq_len``, and
the request's blocks are capped at what those indices need (:mod:`momentkv.integrations.vllm.blocks`).
Positions (RoPE) stay absolute: the runner computes them.

:class:`EvictingBuilder` turns the step's decode rows into index tensors once per step
(:class:`momentkv.integrations.vllm.rows.DecodeBatch`); each layer's :class:`EvictingImpl` then ranks the full
rows' generated slots in one call into the core, writes every row's new token with one indexed store, and
folds this step's attention into the scorer states of all rows holding the same number of tokens at once.

Scorer states, and each slot's sequence index, live in pools addressed by slot index
(:class:`momentkv.core.paged.PagedStates`), on the cache's device, so they follow a request through continuous
batching without a request id. The context length of a request is recorded, keyed by the first block of its
block table, on every step where its row is prefilling (the last chunk of a chunked prefill leaves the full
length). A preempted request is recomputed: its prompt and every token it generated are prefilled again and
all become its context (the tokens it had evicted come back), and its scoring starts afresh.

Scorers that read this step's attention get the softmax of each row's query over its stored keys, averaged
over each KV head's query group, at the generated slots: read in place by a native function where the device's
backend provides one (the CPU's, :mod:`momentkv.core.paged_probs`), else from the keys read back block by
block into one tensor with the softmax computed in torch. The keys and values of the generated slots are
gathered for the core only where a scorer reads them (``Scorer.reads_cache``).

Once a row's budget is full, a plan whose every-step scoring is one closed computation folds through the fused
step, which also names each head's victim for the next token: on the CPU natively on the pools where they lie
(:meth:`PagedStates.fold_in_place`: no gathered copy of states, positions or totals), elsewhere on gathered views
(:meth:`LayerEviction.fold` with per-row ``now`` and context length); the impl keeps it beside the row's first
generated slot, stamped with the fold's sequence index, and the next write takes it without ranking again (any
row whose last fold was not such a step is ranked by the core as before).

What a device adds (:mod:`~momentkv.integrations.vllm.backend` for the CPU, :mod:`~momentkv.integrations.vllm.cuda`)
is where a layer's keys and values lie in its ``kv_cache`` (:meth:`EvictingImpl._split`), and where it has them,
native functions that read the attention in place and write decode tokens (:mod:`momentkv.core.paged_probs`,
:mod:`momentkv.core.paged_write`); the stock cache write for prefill rows and the stock attention call are the
stock impl's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from momentkv.core.eviction import LayerEviction
from momentkv.core.group_attention import group_attention
from momentkv.core.paged import PagedStates
from momentkv.core.paged_probs import PagedProbs
from momentkv.core.paged_write import PagedWrite
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


@functools.cache
def _with_decode(metadata_cls: type) -> type:
    """``metadata_cls`` (a stock backend's metadata dataclass) with one field more: the step's decode rows."""
    return dataclasses.make_dataclass(
        f"MomentKV{metadata_cls.__name__}",
        [("decode", "DecodeBatch | None", dataclasses.field(default=None))], bases=(metadata_cls,))


class EvictingBuilder:
    """Mixin over a stock metadata builder: each decode row's ``seq_len`` is set to its physical length before
    the stock ``build``, and the step's decode rows (:class:`DecodeBatch`, on the cache's device) ride along in
    the metadata's ``decode``."""

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
        prefilling = prefilling[:n].to("cpu") if prefilling is not None else None
        table = cm.block_table_tensor[:n].to("cpu")  # one copy, where the engine keeps it on a GPU
        new_seq = seq.clone()
        rows, tokens, prompts, generated = [], [], [], []
        for r in range(n):
            first, length = int(table[r, 0]), int(seq[r])
            if first == 0:  # the null block: a dummy (warm-up) row, left to the stock path and never recorded
                continue
            if (bool(prefilling[r]) if prefilling is not None else int(qlen[r]) > 1) or int(qlen[r]) != 1:
                self.prompts[first] = length
                continue
            prompt = self.prompts.get(first)
            if prompt is None:
                # Its blocks are capped (blocks.py): the stock write would land outside them.
                raise RuntimeError(f"momentkv: a decode row (first block {first}) whose prefill was never seen")
            g = length - 1 - prompt
            new_seq[r] = prompt + min(g + 1, budget)
            rows.append(r)
            tokens.append(int(starts[r]))
            prompts.append(prompt)
            generated.append(g)
        if rows:
            seq_lens = cm.seq_lens.clone()
            seq_lens[:n] = new_seq.to(seq_lens.device)
            cm = dataclasses.replace(cm, seq_lens=seq_lens, max_seq_len=int(new_seq.max()))
        meta = super().build(common_prefix_len, cm, fast_build)
        decode = None
        if rows:
            decode = DecodeBatch.make(tokens, prompts, generated, table[rows], budget, self.block_size, rt.batched,
                                      rt.needs_attention).to(cm.seq_lens.device)
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.init}
        return _with_decode(type(meta))(**fields, decode=decode)


class EvictingImpl:
    """Mixin over a stock attention impl: decode rows are written into their victim slots and folded into the
    scorers; everything else (prefill rows, the attention itself) is the stock impl's. A subclass names where
    the keys and values lie (:meth:`_split`, :meth:`_keys_transposed`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "kv_sharing_target_layer_name", None) is not None:  # it would write into another's cache
            raise PolicyError(f"momentkv's vLLM backend does not support layers that share another layer's KV cache "
                              f"({self.kv_sharing_target_layer_name})")
        self.rt = runtime()
        self.core: LayerEviction | None = None

    def _keys_transposed(self, layer, kv_cache: torch.Tensor) -> bool:
        """Whether each (block, KV head) of ``kv_cache`` stores its keys transposed, ``(head_size, block_size)``."""
        raise NotImplementedError

    def _paged_probs(self) -> PagedProbs | None:
        """The native reader of this step's attention in place, where the cache's packing is the one it reads."""
        return None

    def _paged_write(self) -> PagedWrite | None:
        """The native writer of decode tokens and their slots' bookkeeping, where the cache's packing is its."""
        return None

    def _split(self, kv_cache: torch.Tensor):
        """Keys and values of ``kv_cache`` ``[blocks, kv_heads, block_size, ...]`` as views: keys
        ``(blocks, kv_heads, head_size, block_size)`` where :meth:`_keys_transposed`, else
        ``(blocks, kv_heads, block_size, head_size)``; values ``(blocks, kv_heads, block_size, head_size)``."""
        raise NotImplementedError

    # ------------------------------------------------------------ per-layer state, made on first use
    def _start(self, layer, kv_cache: torch.Tensor) -> None:
        idx = extract_layer_index(layer.layer_name)
        self.plan = self.rt.plans[idx]
        self.core = LayerEviction(self.plan)
        blocks, heads, self.block_size, _ = kv_cache.shape
        slots = blocks * self.block_size
        device = self.device = kv_cache.device
        self.heads = torch.arange(heads, device=device)
        self.positions = torch.zeros(slots, heads, dtype=torch.long, device=device)
        self.states = PagedStates([s.state_channels for s in self.plan.scorers], slots, heads, device=device)
        # What a steady fold named for the next token (the fused step ranks as it folds), keyed by the request's
        # first generated slot, with the sequence index of the fold that named it (-1: nothing named).
        self.named = torch.zeros(slots, heads, dtype=torch.long, device=device)
        self.named_at = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.keys_transposed = self._keys_transposed(layer, kv_cache)
        self.paged_probs = self._paged_probs()
        self.paged_write = self._paged_write()

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
        _, heads, bs, _ = kv_cache.shape
        n, m = blocks.shape
        d = self.head_size
        tiles = self._split(kv_cache)[0].index_select(0, blocks.reshape(-1))  # (n*m, H, bs, d) or (n*m, H, d, bs)
        if self.keys_transposed:
            return tiles.view(n, m, heads, d, bs).permute(0, 2, 3, 1, 4).reshape(n, heads, d, m * bs).transpose(2, 3)
        return tiles.view(n, m, heads, bs, d).permute(0, 2, 1, 3, 4).reshape(n, heads, m * bs, d)

    def _view(self, kv_cache, table: torch.Tensor, now, cache: bool = True) -> ScoreContext:
        """The core's view of the generated slots ``table`` ``(n, T)``, the newest token at ``now``; their keys and
        values only with ``cache`` and where a scorer reads them."""
        k = v = None
        if cache and self.rt.reads_cache:
            k, v = self._read(kv_cache, table)
        positions = self.states.read(self.positions, table)  # (n, H, T)
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
            if len(batch.tokens) < n:  # prefilling rows too (the decode rows' tokens are distinct)
                stock = torch.ones(n, dtype=torch.bool, device=key.device)
                stock[batch.tokens] = False
                self.do_kv_cache_update(layer, key[:n][stock], value[:n][stock], kv_cache,
                                        attn_metadata.slot_mapping[:n][stock])
            if self.core is None:
                self._start(layer, kv_cache)
            self._write(batch, key, value, kv_cache)
        fused = batch is not None and self._attends_itself(batch, n, query, kv_cache, output, output_scale,
                                                           output_block_scale)
        if not fused:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        if batch is not None:
            attended = self._fold(batch, query, kv_cache, output if fused else None)
            if fused and not attended:  # some group's native call declined: the stock kernel answers every row
                super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                output_block_scale)
        return output

    def _attends_itself(self, batch: DecodeBatch, n: int, query, kv_cache, output, output_scale,
                        output_block_scale) -> bool:
        """Whether this step's attention output comes from the scorers' own pass over the keys (the native reader,
        which then also writes the output) instead of the stock kernel: a step of decode rows only, whose scorers
        read the attention, in float32, with nothing the native pass does not compute (ALiBi, a soft cap, sinks, a
        sliding window, a quantised cache, a fused output scale). ``MOMENTKV_VLLM_FUSED_ATTENTION=0`` turns it off."""
        return (self.paged_probs is not None and self.plan.needs_step_attention and len(batch.tokens) == n
                and output_scale is None and output_block_scale is None
                and query.dtype == kv_cache.dtype == output.dtype == torch.float32 and output.dim() == 3
                and getattr(self, "alibi_slopes", None) is None and not getattr(self, "logits_soft_cap", 0)
                and getattr(self, "sinks", None) is None and getattr(self, "sliding_window", -1) in (-1, None)
                and getattr(self, "kv_cache_dtype", "auto") == "auto"
                and os.environ.get("MOMENTKV_VLLM_FUSED_ATTENTION", "1") != "0")

    def _write(self, batch: DecodeBatch, key, value, kv_cache) -> None:
        """Write each row's new token: into its next generated slot, or each head's victim once full; the slot's
        sequence index is stamped and its scorer states start at zero (one native call where the device has it)."""
        rows, heads = len(batch.tokens), len(self.heads)
        where = batch.next_slot.unsqueeze(1).repeat(1, heads)  # (R, H)
        for group in batch.victims:
            where[group.rows] = group.table.gather(1, self._victims(group, kv_cache))  # (n, H)
        if self.paged_write is not None and self.paged_write(kv_cache, key, value, batch.tokens, where,
                                                             self.positions, batch.now, self.states.pools):
            return
        self.states.reset_heads(where)
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
        if bool((self.named_at[first] == torch.as_tensor(group.newest, device=self.device).reshape(-1)).all()):
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

    def _fold(self, batch: DecodeBatch, query, kv_cache, output=None) -> bool:
        """Fold this step's attention into the rows' scorer states (``fold`` of the core), and record the victim a
        steady fold names for the next write (:meth:`_victims`). With ``output``, the pass that reads this step's
        attention also writes the rows' attention output there; returns whether it did for every row."""
        scoring = self.core.scoring
        attended = True
        for group in batch.folds:
            attention = None
            if self.plan.needs_step_attention:
                attention, wrote = self._attention(group, query, kv_cache, output)
                attended = attended and wrote
            steady = group.held == self.rt.budget and self.core.spec is not None
            victim = None
            if steady:  # natively on the pools where they lie, where the plan and device allow
                victim = self.states.fold_in_place(self.core, attention, self.positions, group.table, group.now,
                                                   group.prompt)
            if victim is None:
                self.states.load(scoring, group.table)
                view = self._view(kv_cache, group.table, group.now)
                self.core.fold(attention, view, group.prompt if steady else None)
                self.states.store(scoring, group.table)
                victim = self.core.named_victim(view) if steady else None
            first = group.table[:, 0]
            if victim is None:
                self.named_at[first] = -1
            else:
                self.named[first] = victim[:, :, 0]
                self.named_at[first] = torch.as_tensor(group.now, device=self.device).reshape(-1)
        return attended and output is not None

    def _attention(self, group, query, kv_cache, output=None) -> tuple[torch.Tensor, bool]:
        """This step's attention ``(n, kv_heads, held)`` of the group's queries at their generated slots, averaged
        over each KV head's query group, and whether the group's attention output was written to ``output``
        (``(num_tokens, heads, head_size)``, where given): read in place by the native function where it takes
        these tensors (it writes the output as it goes), else from a gathered copy of the rows' stored keys."""
        if self.paged_probs is not None:
            first = group.generated[:, 0, 0]  # (n,) the physical index of the first generated slot
            probs = self.paged_probs(kv_cache, query, group.tokens, group.blocks, first + group.held, first,
                                     group.held, self.scale, output)
            if probs is not None:
                return probs, output is not None
        stored = self._stored_keys(kv_cache, group.blocks)  # (n, H, S, D)
        q = query[group.tokens].unsqueeze(2)  # (n, heads, 1, D)
        probs = group_attention(q, stored, group.mask, self.scale)  # (n, H, S)
        return probs.gather(-1, group.generated.expand(-1, probs.shape[1], -1)), False  # (n, H, held)
