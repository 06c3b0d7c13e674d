"""What a scorer is: a small pydantic model whose fields are its parameters, with one method over tensors.

A scorer ranks the evictable tokens of one cache layer; the lowest combined score is evicted first.
Every per-token tensor it sees is shaped ``(batch, kv_heads, tokens)`` where ``tokens`` counts the layer's
evictable slots (the generated tokens, unless the policy makes the prompt evictable too). A scorer keeps no
state of its own: the cache layer owns its ``state`` tensor, which moves with the slots through eviction,
beam reordering and batch selection.

The contract, which custom scorers rely on (see docs/custom-scorers.md):

- ``update(ctx)`` returns this step's scores, ``(batch, kv_heads, tokens)`` float32, higher = keep. It may
  modify ``ctx.state`` in place, and nothing else in ``ctx``.
- It is called after every decode step, or, when ``every_step()`` is False, only on the steps where the layer
  is about to rank its tokens for eviction (with ``cadence: k``, once every ``k`` steps): costly signals
  (redundancy among keys, the attention of a window of queries) are computed only when they are used.
- ``needs_attention`` says whether it reads ``ctx.attention``; ``query_window()`` how many of the last queries
  ``ctx.window_attention`` must be able to give it (a scorer with a query window reads that instead: the
  layer computes ``ctx.attention`` only for the scorers with ``needs_attention`` and no window); ``state_channels`` how many float32 values per token its
  state holds.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Normalization = Literal["none", "sum", "max", "zscore", "rank"]


class ScoreContext:
    """What a scorer may read at one decode step of one layer. Treat every tensor but ``state`` as read-only.

    Attributes:
        attention: ``(batch, kv_heads, tokens)`` float32, the softmax attention that the current query gives
            each evictable token, averaged over the query heads that share its KV head (the softmax runs over
            every stored key, the prompt's included). ``None`` when no scorer of the policy declares
            ``needs_attention``.
        keys: ``(batch, kv_heads, tokens, head_dim)``, the cached keys of the evictable tokens (after RoPE).
        values: ``(batch, kv_heads, tokens, head_dim)``, their cached values.
        state: this scorer's memory, float32, updated in place: ``(batch, kv_heads, tokens)``, or
            ``(state_channels, batch, kv_heads, tokens)`` when the scorer declares more than one channel.
            A new token's entries start at 0.
        positions: ``(batch, kv_heads, tokens)`` int64, each token's sequence index (0 for the first prompt
            token; padding counts, as in the model's own cache).
        now: the sequence index of the newest token (the one written at this step): an int, or, where an
            engine batches sequences of different lengths (the vLLM backend), a ``(batch, 1, 1)`` int64
            tensor, one index per row, for the scorers that declare ``batched_now``.
        age: ``(batch, kv_heads, tokens)`` float32, ``now - positions``: 0 for the newest token. Computed on
            first use.
        valid: ``(batch, kv_heads, tokens)`` bool, False at padding; ``None`` when there is no padding.
        layer_idx, num_layers: where the layer sits in the model.
    """

    __slots__ = ("attention", "keys", "values", "state", "positions", "_now", "valid", "layer_idx", "num_layers",
                 "_age", "_window")

    def __init__(self, attention, keys, state, age=None, positions=None, now=None, values=None, valid=None,
                 layer_idx: int = 0, num_layers: int = 1,
                 window: Callable[[int], torch.Tensor] | None = None):
        self.attention, self.keys, self.values, self.state = attention, keys, values, state
        self.positions, self._now, self.valid = positions, now, valid
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self._age, self._window = age, window

    @property
    def now(self) -> int | None:
        return self._now

    @now.setter
    def now(self, value: int) -> None:
        """A layer reuses one context from step to step: a new ``now`` drops the age computed for the old one."""
        if value != self._now:
            self._now, self._age = value, None

    @property
    def age(self) -> torch.Tensor:
        if self._age is None:
            self._age = (self._now - self.positions).to(torch.float32)
        return self._age

    def window_attention(self, window: int) -> torch.Tensor:
        """The attention of the last ``window`` queries, per query head: ``(batch, kv_heads, groups, w, tokens)``.

        float32 softmax rows, one per query (oldest first) and query head (``groups`` query heads share each KV
        head), over every key stored now, each query seeing only the tokens at or before its own position
        (and within the layer's sliding window, and not padding), restricted to the evictable tokens.
        ``w <= window``: fewer at the very start of a sequence. Only as many queries as the scorer's
        ``query_window()`` asked for are kept; asking for more raises ``ValueError``.
        """
        if self._window is None:
            raise ValueError("this layer keeps no query window: the scorer must return it from query_window()")
        return self._window(window)


class Scorer(BaseModel):
    """Base class of every scorer. Subclass it, add pydantic fields for the parameters, implement ``update``.

    ``type`` is the name the policy language uses; ``weight`` and ``normalize`` say how the scorer's output
    joins the weighted sum that ranks tokens.
    """

    # strict: a quoted "0.5" or a bool where a number belongs is a mistake in a policy file, not a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    weight: float = Field(
        1.0, allow_inf_nan=False,
        description="Factor of this scorer in the weighted sum of scores (finite; 0 mutes the scorer).",
    )
    normalize: Normalization = Field(
        "none",
        description="Rescaling per (batch, kv head) before weighting, so scorers of different scales combine: "
        "none, sum (divide by the sum), max (divide by the maximum), zscore, rank (0 for the lowest, 1 for the highest).",
    )

    #: Whether ``ScoreContext.attention`` must be computed for this scorer (costs one q.K pass per layer).
    needs_attention: ClassVar[bool] = True
    #: Float32 values per token in ``ScoreContext.state``.
    state_channels: ClassVar[int] = 1
    #: Whether ``update`` also accepts ``ScoreContext.now`` as a ``(batch, 1, 1)`` tensor (it only uses ``now``
    #: in arithmetic with ``positions``, or reads ``age``). An engine batching sequences of different lengths
    #: gives a scorer that leaves this False one sequence at a time, with an int ``now``.
    batched_now: ClassVar[bool] = False
    #: Whether ``update`` reads ``ScoreContext.keys`` or ``ScoreContext.values``. An engine that must gather
    #: them from a paged cache (the vLLM backend) skips that where no scorer reads them.
    reads_cache: ClassVar[bool] = True

    def query_window(self) -> int:
        """How many of the last queries ``ctx.window_attention`` must be able to give (0: none)."""
        return 0

    def every_step(self) -> bool:
        """True: ``update`` runs after every decode step. False: only when the layer is about to rank."""
        return True

    def update(self, ctx: ScoreContext) -> torch.Tensor:
        """Return this step's scores, ``(batch, kv_heads, tokens)`` float32; higher means keep."""
        raise NotImplementedError
