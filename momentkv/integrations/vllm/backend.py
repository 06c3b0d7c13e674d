"""vLLM's CPU attention backend with momentkv's decode eviction (registered by the plugin when a policy is set).

Each request keeps its prompt whole and at most ``budget`` generated tokens per layer and KV head. A request
with prompt ``P`` lays its tokens out in its blocks at *physical* indices: the prompt at ``0 .. P-1``, the
generated tokens at ``P .. P+budget-1`` (slot of index ``i`` = ``block_table[i // block_size] * block_size +
i % block_size``, the engine's own mapping). Until the budget is full a generated token goes where vLLM
would put it; from then on each KV head writes it, through the backend's own cache-write op, into the slot
of that head's lowest-ranked generated token (:class:`momentkv.core.eviction.LayerEviction`). Every head of a
request therefore holds ``P + min(generated, budget)`` tokens: the metadata builder gives the attention
kernel that ``seq_len``. Positions (RoPE) stay absolute: the runner computes them.

Scorer states, and each slot's sequence index, live in pools addressed by slot index
(:class:`momentkv.core.paged.PagedStates`), so they follow a request through continuous batching without a
request id. The prompt length of a request is recorded, keyed by the first block of its block table, on
every step where its row is prefilling (the last chunk of a chunked prefill leaves the full length);
a preempted and recomputed request re-prefills prompt and generated tokens, which all become context.

Scorers that read this step's attention get it from a softmax computed here in torch over the request's
stored keys, read back from the paged cache (the attention op returns no probabilities).
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
from momentkv.core.plan import build_plans
from momentkv.errors import PolicyError
from momentkv.integrations.vllm import check, policy_source
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
        logger.info("momentkv: policy %s, %d generated tokens per layer and KV head",
                    self.policy.name or json.dumps(source), self.budget)


_RUNTIME: _Runtime | None = None


def runtime(vllm_config=None) -> _Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _Runtime(vllm_config if vllm_config is not None else get_current_vllm_config())
    return _RUNTIME


@dataclasses.dataclass
class DecodeRow:
    """One request's decode token in this step."""

    token: int  # its index among the step's tokens
    prompt: int  # P: the request's context length
    generated: int  # tokens generated before this one (its sequence index is P + generated)
    table: torch.Tensor  # the request's block table row


@dataclasses.dataclass
class MomentKVMetadata(CPUAttentionMetadata):
    rows: list = dataclasses.field(default_factory=list)


class MomentKVMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock builder, with each decode row's ``seq_len`` set to its physical length."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        runtime(self.vllm_config)
        self.prompts: dict[int, int] = {}  # first block of a request -> its prompt length
        self.unknown = 0

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        budget = runtime().budget
        n = cm.num_reqs
        seq = cm.seq_lens[:n].to("cpu")
        starts = cm.query_start_loc_cpu[: n + 1]
        qlen = starts[1:] - starts[:-1]
        prefilling = cm.is_prefilling
        table = cm.block_table_tensor
        new_seq = cm.seq_lens.clone()
        rows = []
        for r in range(n):
            first, length = int(table[r, 0]), int(seq[r])
            if (bool(prefilling[r]) if prefilling is not None else int(qlen[r]) > 1) or int(qlen[r]) != 1:
                self.prompts[first] = length
                continue
            prompt = self.prompts.get(first)
            if prompt is None:  # never saw its prefill (a dummy run): left to the stock path
                self.unknown += 1
                continue
            generated = length - 1 - prompt
            new_seq[r] = prompt + min(generated + 1, budget)
            rows.append(DecodeRow(int(starts[r]), prompt, generated, table[r]))
        cm = dataclasses.replace(cm, seq_lens=new_seq)
        meta = super().build(common_prefix_len, cm, fast_build)
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return MomentKVMetadata(**fields, rows=rows)


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
        self.keys_transposed = _probe_packing(layer.isa, heads, self.head_size, self.block_size, kv_cache.dtype)

    def _slots(self, row: DecodeRow, index: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return row.table[index // bs].long() * bs + index % bs

    def _read(self, key_cache, value_cache, slots: torch.Tensor):
        """Keys and values ``(1, kv_heads, S, head_size)`` stored at ``slots`` ``(S,)``."""
        bs = self.block_size
        blocks, offsets = slots // bs, slots % bs
        used, where = torch.unique(blocks, return_inverse=True)
        k = key_cache[used]  # (U, H, bs, D) as stored
        if self.keys_transposed:
            k = k.reshape(k.shape[0], k.shape[1], self.head_size, bs)[where, :, :, offsets]  # (S, H, D)
        else:
            k = k[where, :, offsets]
        v = value_cache[used][where, :, offsets]  # (S, H, D)
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    def _view(self, key_cache, value_cache, slots: torch.Tensor, now: int) -> ScoreContext:
        keys, values = self._read(key_cache, value_cache, slots)
        positions = self.positions[slots].transpose(0, 1).unsqueeze(0)  # (1, H, T)
        return ScoreContext(None, keys, None, positions=positions, values=values, now=now,
                            layer_idx=self.plan.layer_idx, num_layers=self.plan.num_layers)

    # ------------------------------------------------------------ the step
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:
            return output
        n = attn_metadata.num_actual_tokens
        rows = getattr(attn_metadata, "rows", [])
        stock = torch.ones(n, dtype=torch.bool)
        for row in rows:
            stock[row.token] = False
        if bool(stock.all()):
            self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache, attn_metadata.slot_mapping[:n])
        elif bool(stock.any()):
            self.do_kv_cache_update(layer, key[:n][stock], value[:n][stock], kv_cache,
                                    attn_metadata.slot_mapping[:n][stock])
        if rows:
            if self.core is None:
                self._start(layer, kv_cache)
            blocks, heads, bs, _ = kv_cache.shape
            key_cache, value_cache = kv_cache.view(blocks, heads, 2 * bs, -1).chunk(2, dim=2)
            for row in rows:
                self._write(layer, row, key, value, key_cache, value_cache)
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if rows:
            for row in rows:
                self._fold(row, query, key_cache, value_cache)
        return output

    def _write(self, layer, row: DecodeRow, key, value, key_cache, value_cache) -> None:
        """Write the row's new token: into the next generated slot, or each head's victim once full."""
        budget, p, g = self.plan.budget, row.prompt, row.generated
        scoring = self.core.scoring
        if g >= budget:
            table = self._slots(row, torch.arange(p, p + budget))  # (B,)
            self.states.load(scoring, table.unsqueeze(0))
            victim = self.core.lowest(self._view(key_cache, value_cache, table, p + g - 1), p)  # (1, H, 1)
            scoring.reset_slot(victim)
            self.states.store(scoring, table.unsqueeze(0))
            where = table[victim[0, :, 0]]  # (H,) one slot per KV head
        else:
            where = self._slots(row, torch.tensor([p + g])).expand(len(self.heads)).contiguous()
            for pool in self.states.pools:
                pool[..., where, self.heads] = 0.0
        t = row.token
        for h in range(len(self.heads)):
            ops.cpu_attn_reshape_and_cache(
                key[t : t + 1, h : h + 1], value[t : t + 1, h : h + 1], key_cache[:, h : h + 1],
                value_cache[:, h : h + 1], where[h : h + 1], layer.isa, k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
        self.positions[where, self.heads] = p + g

    def _fold(self, row: DecodeRow, query, key_cache, value_cache) -> None:
        """Fold this step's attention into the row's scorer states (``fold`` of the core)."""
        budget, p, g = self.plan.budget, row.prompt, row.generated
        held = min(g + 1, budget)
        table = self._slots(row, torch.arange(p, p + held))
        view = self._view(key_cache, value_cache, table, p + g)
        attention = None
        if self.plan.needs_step_attention:
            stored = self._slots(row, torch.arange(p + held))
            keys, _ = self._read(key_cache, value_cache, stored)
            q = query[row.token].unsqueeze(0).unsqueeze(2)  # (1, heads, 1, D)
            attention = group_attention(q, keys, None, self.scale)[..., p:]
        scoring = self.core.scoring
        self.states.load(scoring, table.unsqueeze(0))
        self.core.fold(attention, view)
        self.states.store(scoring, table.unsqueeze(0))


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
