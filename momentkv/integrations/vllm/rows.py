"""The decode rows of one vLLM step, as index tensors every layer of the step shares.

A request with context ``P`` keeps its context at physical indices ``0 .. P-1`` of its blocks and its generated
tokens at ``P .. P+budget-1`` (see :mod:`momentkv.integrations.vllm.backend`); physical index ``i`` lives in
slot ``block_table[i // block_size] * block_size + i % block_size``. :meth:`DecodeBatch.make` turns the step's
decode rows (their context lengths, tokens generated so far and block tables) into the slots, groups, masks
and indices the backend's layers use, once per step instead of once per layer.

Rows are grouped so that one call into the scoring core serves many requests: the rows whose budget is full
rank their generated slots together (:class:`VictimGroup`), and the rows holding the same number of generated
tokens after the write fold this step's attention together (:class:`FoldGroup`; in the steady state that is
every row). Sequence indices differ from row to row, so ``now`` is a ``(n, 1, 1)`` tensor there; a policy with
a scorer that does not take that (``Scorer.batched_now``) gets one row per group and an int ``now``.

No vLLM import: the tests build batches from synthetic block tables.
"""

from __future__ import annotations

import dataclasses

import torch


def slots_of(table: torch.Tensor, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots ``(R, K)`` int64 of physical indices ``index`` ``(R, K)`` in block tables ``table`` ``(R, blocks)``
    (indices past the table's end are clamped to its last slot: such entries are never used)."""
    index = index.clamp(max=table.shape[1] * block_size - 1)
    return table.gather(1, index // block_size).long() * block_size + index % block_size


def _now(now: torch.Tensor, batched: bool):
    """``now`` ``(n,)`` as the core takes it: ``(n, 1, 1)`` when batched, else the int of its one row."""
    return now.view(-1, 1, 1) if batched else int(now)


@dataclasses.dataclass
class VictimGroup:
    """Rows whose budget is full: each head of each row gives its lowest-ranked generated slot to the new token."""

    rows: torch.Tensor  # (n,) indices into the batch
    table: torch.Tensor  # (n, B) the slots of physical indices P .. P+B-1
    newest: torch.Tensor | int  # the sequence index of the newest stored token, (n, 1, 1) or int
    prompt: torch.Tensor  # (n, 1, 1) context lengths (sinks are the tokens right after the context)


@dataclasses.dataclass
class FoldGroup:
    """Rows holding ``held`` generated tokens after this step's write: this step's attention is folded into
    their scorer states together."""

    rows: torch.Tensor  # (n,)
    held: int
    table: torch.Tensor  # (n, held) the slots of physical indices P .. P+held-1
    now: torch.Tensor | int  # the sequence index of the token written this step, (n, 1, 1) or int
    prompt: torch.Tensor | int  # the rows' context lengths, (n, 1, 1) or int (as ``now``)
    tokens: torch.Tensor  # (n,) the rows' indices among the step's tokens (their queries)
    blocks: torch.Tensor | None  # (n, m) the blocks holding physical indices 0 .. P+held-1 (attention only)
    mask: torch.Tensor | None  # (n, 1, 1, m * block_size) bool: the slots of those blocks that hold a token
    generated: torch.Tensor | None  # (n, 1, held) where the generated tokens sit among those slots


@dataclasses.dataclass
class DecodeBatch:
    """The step's ``R`` decode rows (see the module docstring)."""

    tokens: torch.Tensor  # (R,) each row's index among the step's tokens
    now: torch.Tensor  # (R,) the sequence index of each row's new token, P + generated
    next_slot: torch.Tensor  # (R,) the slot of physical index P + generated: where a growing row writes
    victims: list[VictimGroup]
    folds: list[FoldGroup]

    @classmethod
    def make(cls, tokens: list[int], prompt: list[int], generated: list[int], table: torch.Tensor, budget: int,
             block_size: int, batched: bool = True, attention: bool = True) -> DecodeBatch:
        """Args:
            tokens, prompt, generated: per row, its index among the step's tokens, its context length ``P``,
                and the tokens it generated before this step's.
            table: ``(R, blocks)`` the rows' block tables.
            batched: group rows of different lengths (every scorer takes a tensor ``now``).
            attention: build the blocks, masks and indices the attention scorers need.
        """
        tokens, prompt, generated = (torch.tensor(v, dtype=torch.long) for v in (tokens, prompt, generated))
        table = table.to("cpu").long()
        now = prompt + generated
        full = generated >= budget
        held = (generated + 1).clamp(max=budget)  # after this step's write
        generated_slots = slots_of(table, prompt.unsqueeze(1) + torch.arange(budget), block_size)  # (R, B)
        next_slot = slots_of(table, now.unsqueeze(1), block_size)[:, 0]

        if batched:
            victim_rows = [full.nonzero()[:, 0]] if bool(full.any()) else []
            fold_rows = [(held == h).nonzero()[:, 0] for h in torch.unique(held)]
        else:
            victim_rows = [torch.tensor([r]) for r in full.nonzero()[:, 0].tolist()]
            fold_rows = [torch.tensor([r]) for r in range(len(tokens))]

        victims = [VictimGroup(rows, generated_slots[rows], _now(now[rows] - 1, batched), prompt[rows].view(-1, 1, 1))
                   for rows in victim_rows]
        folds = []
        for rows in fold_rows:
            h = int(held[rows[0]])
            blocks = mask = where = None
            if attention:
                length = prompt[rows] + h  # (n,) tokens stored after the write
                count = -(-int(length.max()) // block_size)
                blocks = table[rows, :count]
                mask = (torch.arange(count * block_size) < length.unsqueeze(1)).view(len(rows), 1, 1, -1)
                where = (prompt[rows].unsqueeze(1) + torch.arange(h)).unsqueeze(1)
            folds.append(FoldGroup(rows, h, generated_slots[rows, :h], _now(now[rows], batched),
                                   _now(prompt[rows], batched), tokens[rows], blocks, mask, where))
        return cls(tokens, now, next_slot, victims, folds)

    def to(self, device) -> DecodeBatch:
        """This batch with every tensor on ``device`` (itself where they already are there): the builder makes it
        on the CPU, the layers of a GPU engine index the cache on the GPU."""
        device = torch.device(device)
        if self.tokens.device == device:
            return self
        return _moved(self, device)


def _moved(value, device):
    """``value`` with its tensors moved to ``device``: a tensor, a list, or one of this module's dataclasses."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _moved(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value
