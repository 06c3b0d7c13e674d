"""The invariant checks on a :class:`~momentkv.testing.traces.TraceRun`."""

from __future__ import annotations


import torch

from momentkv.policy.loader import PolicySource, load_policy
from momentkv.scoring import ScoreContext
from momentkv.testing.traces import DecodeTrace, StepRecord, TraceRun, run_trace


def _fail(run: TraceRun, record: StepRecord | None, message: str):
    where = f"after {record.generated} generated tokens" if record is not None else ""
    raise AssertionError(f"policy {run.policy.name!r}, layer {run.plan.layer_idx}, {where}: {message}\n{run.trace}")


def _present(record: StepRecord, wanted: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, len(wanted))`` bool: whether each wanted position is stored in each head."""
    return (record.positions.unsqueeze(-1) == wanted.view(1, 1, 1, -1)).any(dim=-2)


def check_slots(run: TraceRun) -> None:
    """Each slot holds exactly the key and value of the token its position names; no token is stored twice."""
    trace = run.trace
    for record in [run.prompt, *run.records]:
        seen = trace.prompt_len + record.generated
        pos = record.positions
        if bool((pos < 0).any()) or bool((pos >= seen).any()):
            _fail(run, record, f"a slot names a token that was not fed: {pos.tolist()}")
        ordered = pos.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            _fail(run, record, "a token is stored twice in one head")
        index = pos.unsqueeze(-1).expand(-1, -1, -1, trace.head_dim)
        if not torch.equal(record.keys, trace.keys.gather(2, index)):
            _fail(run, record, "a slot's key is not the key of the token its position names")
        if not torch.equal(record.values, trace.values.gather(2, index)):
            _fail(run, record, "a slot's value is not the value of the token its position names")


def _evictable(run: TraceRun, record: StepRecord) -> torch.Tensor:
    """Evictable tokens stored per (batch, kv head)."""
    if run.plan.scope == "all":
        return torch.full(record.positions.shape[:2], record.positions.shape[-1])
    return (record.positions >= run.trace.prompt_len).sum(-1)


def check_budget(run: TraceRun) -> None:
    """The evictable tokens never exceed the budget (``+ cadence - 1`` between evictions)."""
    plan = run.plan
    if plan.budget is None:
        return
    for record in run.records:
        bound = plan.budget_at(record.generated) + plan.cadence - 1
        held = int(_evictable(run, record).max())
        if held > bound:
            _fail(run, record, f"{held} evictable tokens stored, budget {plan.budget_at(record.generated)} "
                               f"(cadence {plan.cadence}) allows {bound}")


def check_protected(run: TraceRun) -> None:
    """The prompt (scope decode), the sinks and the recent tokens are never evicted; nothing is evicted from a
    layer without budget."""
    plan, p = run.plan, run.trace.prompt_len
    keep_prompt = run.policy.prefill.type == "keep"
    for record in run.records:
        seen = p + record.generated
        if plan.budget is None:
            wanted = torch.arange(seen) if keep_prompt else torch.arange(p, seen)
            what = "a token (the layer has no budget)"
        else:
            parts = [torch.arange(p, p + min(plan.sinks, record.generated))]  # sinks: the first generated
            # recent, the newest included; prompt tokens a prefill compressor dropped cannot be among them
            parts.append(torch.arange(max(0 if keep_prompt else p, seen - max(plan.recent, 1)), seen))
            if plan.scope == "decode" and keep_prompt:
                parts.append(torch.arange(p))
            wanted = torch.cat(parts).unique()
            what = "a protected token (prompt, sink or recent)"
        present = _present(record, wanted)
        if not bool(present.all()):
            missing = wanted[~present.all(dim=(0, 1))].tolist()
            _fail(run, record, f"{what} was evicted: positions {missing}")
        if plan.scope == "decode" and not keep_prompt:
            if not torch.equal(_prompt_kept(record, p), _prompt_kept(run.records[0], p)):
                _fail(run, record, "the prompt tokens kept by the prefill compressor changed during decoding")


def _prompt_kept(record: StepRecord, prompt_len: int) -> torch.Tensor:
    """The prompt positions stored in each head, ascending, with the other slots as ``prompt_len`` at the end."""
    return record.positions.clamp(max=prompt_len).sort(-1).values[..., : int((record.positions < prompt_len).sum(-1).max()) + 1]


def check_scores(run: TraceRun) -> None:
    """Every scorer returns finite scores of the right shape and leaves its context alone; the combined scores
    are never NaN; with ``granularity: layer`` every KV head of a row keeps the same tokens.

    Each scorer is called on its own (:func:`_check_each_scorer`), so a scorer whose NaN or wrongly shaped
    output a normalisation or another scorer's sum would hide is still caught, and named.
    """
    for record in run.records:
        if record.scores is not None and bool(torch.isnan(record.scores).any()):
            _fail(run, record, "a score is NaN")
        if run.plan.granularity == "layer" and run.plan.budget is not None and run.policy.prefill.type == "keep":
            generated = record.positions.masked_fill(record.positions < run.trace.prompt_len, -1).sort(-1).values
            if not bool((generated == generated[:, :1]).all()):
                _fail(run, record, "granularity: layer, yet the KV heads keep different tokens")
    _check_each_scorer(run)


def _evictable_slots(run: TraceRun, record: StepRecord) -> torch.Tensor:
    """``(batch, kv_heads, tokens)`` int64: the slots of the evictable tokens, in slot order."""
    positions = record.positions
    if run.plan.scope == "all":
        return torch.arange(positions.shape[-1]).expand(positions.shape).contiguous()
    evictable = positions >= run.trace.prompt_len
    counts = evictable.sum(-1)
    if not bool((counts == counts.flatten()[0]).all()):
        _fail(run, record, f"the KV heads hold different numbers of evictable tokens: {counts.tolist()}")
    order = torch.sort((~evictable).to(torch.int8), dim=-1, stable=True).indices  # evictable slots first
    return order[..., : int(counts.flatten()[0])]


def _window_of(trace: DecodeTrace, step: int, positions: torch.Tensor, slots: torch.Tensor, limit: int):
    """``ScoreContext.window_attention`` for a trace: the attention of the last queries (at most ``limit``),
    each over the stored tokens at or before its own position, restricted to ``slots``."""

    def window_attention(window: int) -> torch.Tensor:
        if window > limit:
            raise ValueError(f"asked for {window} queries, the scorer's query_window() is {limit}")
        rows = []
        for past in range(max(0, step - window + 1), step + 1):
            liked = trace.logits[:, :, past].gather(-1, positions) * trace.sharpness[past]  # (b, h, S)
            liked = liked.masked_fill(positions > trace.prompt_len + past, float("-inf"))
            rows.append(torch.softmax(liked, dim=-1).nan_to_num(0.0).gather(-1, slots))  # (b, h, T)
        return torch.stack(rows, dim=2).unsqueeze(2)  # (b, h, groups = 1, w, T)

    return window_attention


def _check_each_scorer(run: TraceRun) -> None:
    """Replay the run's steps through each scorer alone, on a :class:`~momentkv.scoring.ScoreContext` built from
    the trace: the tokens the layer kept after each step, the trace's attention, and per-token state that
    follows each token (new tokens start at 0). Each call must return ``(batch, kv_heads, tokens)`` finite
    scores and modify no tensor of the context but ``state``."""
    plan, trace = run.plan, run.trace
    if plan.budget is None:
        return
    total = trace.prompt_len + trace.steps
    # per scorer, its state for every token of the trace: (channels, batch, kv_heads, total positions)
    memories = [torch.zeros((scorer.state_channels, trace.batch, trace.kv_heads, total)) for scorer in plan.scorers]
    for step, record in enumerate(run.records):
        slots = _evictable_slots(run, record)  # (b, h, T)
        positions = record.positions.gather(-1, slots)  # (b, h, T)
        index = positions.unsqueeze(-1).expand(-1, -1, -1, trace.head_dim)
        keys, values = trace.keys.gather(2, index), trace.values.gather(2, index)  # (b, h, T, d)
        attention = trace.attention(step, record.positions).gather(-1, slots)  # (b, h, T)
        for scorer, memory in zip(plan.scorers, memories):
            channels = memory.shape[0]
            state = memory.gather(-1, positions.unsqueeze(0).expand(channels, -1, -1, -1))  # (C, b, h, T)
            state = state[0] if channels == 1 else state
            window = _window_of(trace, step, record.positions, slots, scorer.query_window()) \
                if scorer.query_window() else None
            ctx = ScoreContext(
                attention=attention.clone() if scorer.needs_attention else None, keys=keys.clone(),
                values=values.clone(), state=state, positions=positions.clone(), now=trace.prompt_len + step,
                layer_idx=plan.layer_idx, num_layers=plan.num_layers, window=window,
            )
            out = scorer.update(ctx)
            what = f"scorer {scorer.type!r}"
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(positions.shape):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                _fail(run, record, f"{what} returned {got}, not (batch, kv_heads, tokens) = {tuple(positions.shape)}")
            if not bool(torch.isfinite(out).all()):
                _fail(run, record, f"{what} returned a score that is NaN or infinite")
            for name, seen, given in (("attention", ctx.attention, attention), ("keys", ctx.keys, keys),
                                      ("values", ctx.values, values), ("positions", ctx.positions, positions)):
                if seen is not None and not torch.equal(seen, given):
                    _fail(run, record, f"{what} modified ctx.{name}; a scorer may modify only ctx.state")
            written = ctx.state if channels > 1 else ctx.state.unsqueeze(0)
            memory.scatter_(-1, positions.unsqueeze(0).expand(channels, -1, -1, -1), written)


def _same_records(a: list[StepRecord], b: list[StepRecord]) -> int | None:
    """The first step at which two runs differ, or ``None``."""
    for i, (x, y) in enumerate(zip(a, b)):
        if not (torch.equal(x.positions, y.positions) and torch.equal(x.keys, y.keys)
                and torch.equal(x.values, y.values)):
            return i
    return None


def _compare_runs(first: TraceRun, second: TraceRun) -> None:
    step = _same_records(first.records, second.records)
    if step is not None:
        _fail(first, first.records[step], "a second run of the same trace kept different tokens")
    for x, y in zip(first.records, second.records):
        if (x.scores is None) != (y.scores is None) or (
            x.scores is not None and not torch.equal(x.scores, y.scores)
        ):
            _fail(first, x, "a second run of the same trace computed different scores")


def check_deterministic(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> None:
    """Two runs of the same trace keep the same tokens in the same slots, with equal scores."""
    _compare_runs(run_trace(policy, trace, layer_idx, num_layers), run_trace(policy, trace, layer_idx, num_layers))


def _compare_with_full(run: TraceRun) -> int:
    full_policy = run.policy.model_copy(update={"decode": None})
    full = run_trace(full_policy, run.trace, run.plan.layer_idx, run.plan.num_layers)
    compared = []
    for mine, reference in zip(run.records, full.records):
        budget = run.plan.budget_at(mine.generated)
        if budget is not None and int(_evictable(run, reference).max()) > budget:
            break
        compared.append((mine, reference))
    step = _same_records([m for m, _ in compared], [r for _, r in compared])
    if step is not None:
        _fail(run, compared[step][0], "the cache differs from the full cache although the budget was not reached")
    return len(compared)


def check_matches_full_cache(policy: PolicySource, trace: DecodeTrace, layer_idx: int = 0, num_layers: int = 1) -> int:
    """Until the budget is first reached, the cache equals the full cache (same prefill, no decode eviction).

    Returns how many steps were compared (0 when the budget is reached at the first step).
    """
    return _compare_with_full(run_trace(policy, trace, layer_idx, num_layers))


def check_invariants(policy: PolicySource, trace: DecodeTrace, num_layers: int = 4) -> None:
    """Every check above, on every layer of a ``num_layers``-layer model (schedules, uncompressed layers)."""
    policy = load_policy(policy)
    for layer_idx in range(num_layers):
        run = run_trace(policy, trace, layer_idx, num_layers)
        check_slots(run)
        check_budget(run)
        check_protected(run)
        check_scores(run)
        _compare_runs(run, run_trace(policy, trace, layer_idx, num_layers))
        _compare_with_full(run)
