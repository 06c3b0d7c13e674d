"""The attention of the last prompt queries, per query head, without expanding the keys per query head.

SnapKV-style compressors rank prompt tokens by the attention that the last ``window`` prompt queries give
them. Under SDPA the model returns no attention weights, so the cache layer keeps those query states
(a few rows per layer) during the prompt's forward pass and this module recomputes their attention once,
at the end of the prompt, against the cached keys. Recomputing at the end, rather than recording during
the forward, makes chunked prefill exact: the window may span several chunks.
"""

from __future__ import annotations

import torch


def prompt_window_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Softmax attention of the last prompt queries to the whole prompt, per query head.

    Args:
        queries: ``(batch, heads, window, head_dim)``, the query states (after RoPE and any q-norm) of the
            last ``window`` prompt tokens, in order.
        keys: ``(batch, kv_heads, prompt, head_dim)``, the prompt's cached keys; slot ``j`` holds token ``j``.
        valid: ``(batch, prompt)`` bool, False at padding.
        scaling: the softmax scale the model uses.
        sliding_window: the layer's sliding window in tokens, if any (a query sees keys less than this
            many tokens back, as the model's own mask).

    Returns:
        ``(batch, kv_heads, groups, window, prompt)`` float32, ``groups = heads // kv_heads``. Each row of a
        real query sums to 1 over the keys it may see; rows of padding queries are zero (never NaN).
    """
    b, heads, w, d = queries.shape
    kv, s = keys.shape[1], keys.shape[2]
    groups = heads // kv
    grouped = queries.float().reshape(b, kv, groups * w, d)  # query heads of one group share a KV head
    logits = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(scaling)  # (b, kv, g*w, S)
    logits = logits.view(b, kv, groups, w, s)
    q_pos = torch.arange(s - w, s, device=keys.device).view(w, 1)  # (w, 1)
    k_pos = torch.arange(s, device=keys.device).view(1, s)  # (1, S)
    allowed = (k_pos <= q_pos).unsqueeze(0) & valid.unsqueeze(1)  # (b, w, S)
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window).unsqueeze(0)
    allowed = allowed & valid[:, -w:].unsqueeze(-1)  # a padding query sees nothing
    logits = logits.masked_fill(~allowed.view(b, 1, 1, w, s), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # all-masked rows (padding queries) -> 0
