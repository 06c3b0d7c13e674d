"""Which evictable tokens go first: scores with the policy's protections applied, and the victims they name.

A ranked tensor is the scores of a layer's evictable slots ``(batch, kv_heads, T)`` with

- ``+inf`` at protected slots: the ``sinks`` first generated tokens and the ``recent`` newest ones (the
  incoming tokens count towards ``recent``), which are never evicted;
- ``-inf`` at dead slots, evicted before anything else: tokens a sliding window hides from every future query
  (this overrides protection: a sink no query can see is dead weight), and padding where padding is
  evictable (``scope: all``).

With ``granularity: layer`` the heads share one ranking, the mean of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Protections:
    """A layer's protection rules, resolved once from its plan."""

    sinks: int
    recent: int
    sliding_window: int | None
    padding_evictable: bool
    shared_across_heads: bool


def dead(positions: torch.Tensor, seen: int, window: int | None) -> torch.Tensor | None:
    """``(b, h, T)`` bool: tokens the query at position ``seen`` (and every later one) cannot attend to."""
    return None if window is None else positions <= seen - window


def rank(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, rules: Protections,
         prompt_tokens: int, seen: int, incoming: int) -> torch.Tensor:
    """Ranked scores (see the module docstring) before ``incoming`` tokens at positions ``seen...`` are written.

    Args:
        scores: ``(batch, kv_heads, T)`` float32, higher = keep.
        positions: ``(batch, kv_heads, T)`` sequence indices of the evictable slots.
        valid: ``(batch, kv_heads, T)`` bool or ``None``.
        prompt_tokens: length of the first prompt: sinks are the tokens right after it.
    """
    protected = None
    if rules.sinks:
        protected = (positions >= prompt_tokens) & (positions < prompt_tokens + rules.sinks)
    if rules.recent > incoming:
        newest = positions >= seen + incoming - rules.recent
        protected = newest if protected is None else protected | newest
    ranked = scores if protected is None else scores.masked_fill(protected, float("inf"))
    gone = dead(positions, seen, rules.sliding_window)
    if gone is not None:
        ranked = ranked.masked_fill(gone, float("-inf"))
    if valid is not None and rules.padding_evictable:
        ranked = ranked.masked_fill(~valid, float("-inf"))
    if rules.shared_across_heads:
        ranked = ranked.mean(dim=1, keepdim=True).expand_as(scores)
    return ranked


def lowest(ranked: torch.Tensor) -> torch.Tensor:
    """``(b, h, 1)``: each head's lowest-ranked slot."""
    return ranked.argmin(dim=-1, keepdim=True)


def survivors(ranked: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The slots that stay when each head loses its ``count`` lowest-ranked ones, never a protected one.

    Returns ``(kept, evicted)``: ``kept`` ``(b, h, T - evicted)`` slot indices, ascending; ``evicted <= count``
    (fewer when protections leave fewer candidates in some head).
    """
    count = min(count, int((ranked != float("inf")).sum(-1).min()))
    b, h, t = ranked.shape
    if count <= 0:
        return torch.arange(t, device=ranked.device).expand(b, h, t), 0
    victims = ranked.topk(count, dim=-1, largest=False).indices  # (b, h, count)
    keep = torch.ones_like(ranked, dtype=torch.bool).scatter_(-1, victims, False)
    return keep.nonzero()[:, -1].view(b, h, t - count), count
