"""Long runs: 20,000 decode steps hold the cache at the budget, in place, with flat process memory."""

import gc
import os
import time

import pytest
import torch

import momentkv
from models import tiny_model

STEPS = 20_000
WARMUP = 2_000
PROMPT = 6
BUDGET = 16
POLICY = {"decode": {"budget": BUDGET, "sinks": 2, "recent": 2,
                     "scorers": [{"type": "ema", "alpha": 0.9, "bias_correction": True},
                                 {"type": "accumulated", "weight": 0.1, "normalize": "sum"}]}}
# A leak of one small tensor per step costs at least ~400 bytes (Python wrapper, TensorImpl, storage header)
# and one Python object ~100 bytes; over the 18,000 measured steps that is >= 7 MiB and >= 18,000 objects.
# The bounds sit well below both and above what the allocator drifts without a leak (about 0.1 MiB here,
# measured every 2,000 steps over 20,000 with one thread).
RSS_GROWTH_BOUND = 2 * 2**20
OBJECT_GROWTH_BOUND = 2_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _shapes(layer) -> tuple:
    return (tuple(layer.keys.shape), tuple(layer.values.shape), tuple(layer.positions.shape),
            tuple(layer.scoring.step_total.shape), tuple(tuple(s.shape) for s in layer.scoring.states), layer.valid is None)


@pytest.mark.slow
@torch.no_grad()
def test_twenty_thousand_steps_hold_budget_and_memory_flat():
    model = tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=8, hidden_size=16, intermediate_size=16,
                       vocab_size=16, max_position_embeddings=STEPS + 64)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(3, 16, (STEPS,), generator=g).tolist()
    tokens = [torch.tensor([[t]]) for t in range(16)]  # reused inputs: the loop itself allocates nothing to keep
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and no per-thread arenas blur the RSS
    handle = momentkv.patch(model, POLICY)
    try:
        cache = handle.new_cache()
        model(input_ids=torch.randint(3, 16, (1, PROMPT), generator=g), cache=cache, use_cache=True)
        layer = cache.layers[0]
        steady = None
        for step, token in enumerate(stream):
            out = model(input_ids=tokens[token], position_ids=torch.tensor([[PROMPT + step]]), cache=cache,
                        use_cache=True)
            generated = step + 1
            assert layer.stored == PROMPT + min(generated, BUDGET)
            if step == WARMUP:
                assert torch.isfinite(out.logits).all()
                del out
                gc.collect()
                steady = (_shapes(layer), layer.keys.data_ptr(), layer.values.data_ptr(), layer.positions.data_ptr())
                # Objects first: the list gc.get_objects() builds leaves resident (freed) pages behind.
                objects_start = len(gc.get_objects())
                rss_start, start = _rss_bytes(), time.perf_counter()
            elif step > WARMUP and step % 1000 == 0:
                # No per-step state grows, and eviction writes in place: the same storage every step.
                assert (_shapes(layer), layer.keys.data_ptr(), layer.values.data_ptr(),
                        layer.positions.data_ptr()) == steady
                assert torch.isfinite(layer.scoring.step_total).all()
        del out
        gc.collect()
        rss_growth = _rss_bytes() - rss_start
        object_growth = len(gc.get_objects()) - objects_start
        stats = handle.stats()
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    assert layer.seen == PROMPT + STEPS
    assert stats["evicted"] == STEPS - BUDGET and stats["layers"][0]["peak"] == PROMPT + BUDGET
    # The protected tokens survived 20,000 steps: the prompt, the two sinks, the newest token.
    kept = set(layer.positions[0, 0].tolist())
    assert set(range(PROMPT + 2)) <= kept and PROMPT + STEPS - 1 in kept
    assert rss_growth < RSS_GROWTH_BOUND, f"RSS grew {rss_growth / 2**20:.2f} MiB over {STEPS - WARMUP} steps"
    assert object_growth < OBJECT_GROWTH_BOUND, f"{object_growth} more Python objects after {STEPS - WARMUP} steps"
    print(f"{(STEPS - WARMUP) / (time.perf_counter() - start):.0f} steps/s, RSS growth {rss_growth} B, "
          f"object growth {object_growth}")
