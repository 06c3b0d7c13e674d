"""Where eviction pays on a CPU: decoding against a long cache with a realistic attention shape.

A randomly initialised Llama with 32 query heads, 8 KV heads and head_dim 128 (the attention of an 8B
model), but a small hidden size, MLP and vocabulary, so that attention over the cache is most of a step.
Two caches hold the state a long context leaves behind:

- ``full``: every one of ``context`` tokens (what an unpatched model stores);
- ``momentkv``: a prompt compressed to ``budget - decode_budget`` tokens (what SnapKV keeps of it) plus a
  decode budget of ``decode_budget`` tokens, already full, so every measured step evicts.

Both are filled with random keys and values through the ordinary cache ``update`` (a 16k-token prefill
costs minutes on this CPU and does not change the per-step cost), then both decode the same tokens; the
per-step time is the median over repeats of ``steps`` timed steps.
"""

from __future__ import annotations

import statistics
import time

import torch

import momentkv


def attention_heavy_model(layers: int = 2, seed: int = 0, device: str = "cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=1024, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)
    model.set_attn_implementation("sdpa")
    return model


def _fill(cache, model, tokens: int, generator: torch.Generator) -> None:
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, tokens, cfg.head_dim)
    for idx in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=generator) * 0.5
        v = torch.randn(shape, generator=generator)
        cache.update(k.to(model.device, model.dtype), v.to(model.device, model.dtype), idx)


@torch.no_grad()
def _time_steps(model, cache, start: int, steps: int) -> float:
    """Seconds per decode step over ``steps`` single-token forwards starting at position ``start``."""
    device = model.device
    tokens = torch.randint(0, model.config.vocab_size, (steps + 2,), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)

    def step(i):
        position = torch.tensor([[start + i]], device=device)
        model(input_ids=tokens[i].view(1, 1), position_ids=position, cache=cache, use_cache=True)

    for i in range(2):  # warm-up
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / steps


def run(contexts=(8192, 16384, 32768), budget: int = 1024, decode_budget: int = 128, steps: int = 24,
        repeats: int = 3, policy: str = "moment.yaml", progress=None, device: str = "cpu",
        dtype=torch.float32, layers: int = 2, compiled: bool = False) -> list[dict]:
    """Per context length: seconds per step and stored KV bytes of the full and the compressed cache.

    ``compiled``: momentkv's steps also run through a compiled forward (``momentkv_compiled_tokens_per_s``):
    the cache is filled to its budget eagerly, then the forward is compiled (the two warm-up steps compile it;
    their seconds, first context only, are ``compile_s``).
    """
    from transformers import DynamicCache

    model = attention_heavy_model(layers=layers, device=device, dtype=dtype)
    decode_policy = momentkv.load_policy(policy).model_dump()
    decode_policy["decode"]["budget"] = decode_budget
    decode_policy["name"] = f"{decode_policy['name']}+prompt{budget - decode_budget}"
    rows, compile_seconds = [], []
    for context in contexts:
        per_step = {"full": [], "momentkv": [], "compiled": []}
        kv_bytes = {}
        for repeat in range(repeats):
            gen = torch.Generator().manual_seed(repeat)
            for kind in (["full", "momentkv"] if repeat % 2 == 0 else ["momentkv", "full"]):
                if kind == "full":
                    cache = DynamicCache()
                    _fill(cache, model, context, gen)
                    seconds = _time_steps(model, cache, context, steps)
                    kv_bytes[kind] = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
                else:
                    with momentkv.patched(model, decode_policy) as handle:
                        cache = handle.new_cache()
                        _fill(cache, model, budget - decode_budget, gen)  # the compressed prompt
                        _time_steps(model, cache, context, decode_budget)  # fill the decode budget
                        seconds = _time_steps(model, cache, context + decode_budget + 2, steps)
                        kv_bytes[kind] = cache.stats()["kv_bytes"]
                        if compiled:
                            per_step["compiled"].append(_compiled_steps(model, cache, context + decode_budget
                                                                        + steps + 4, steps, compile_seconds))
                per_step[kind].append(seconds)
                del cache
                if progress is not None:
                    progress.update(1)
        full_s, ours_s = statistics.median(per_step["full"]), statistics.median(per_step["momentkv"])
        rows.append({
            "context": context, "budget": budget,
            "full_tokens_per_s": 1 / full_s, "momentkv_tokens_per_s": 1 / ours_s, "speedup": full_s / ours_s,
            "full_kv_bytes": kv_bytes["full"], "momentkv_kv_bytes": kv_bytes["momentkv"],
        })
        if compiled:
            rows[-1]["momentkv_compiled_tokens_per_s"] = 1 / statistics.median(per_step["compiled"])
            rows[-1]["compile_s"] = compile_seconds[0]
    return rows


def _compiled_steps(model, cache, start: int, steps: int, compile_seconds: list) -> float:
    """Seconds per step of ``cache`` (at its budget) through ``model``'s compiled forward; the first call in the
    process records its two compiling warm-up steps in ``compile_seconds``."""
    from momentkv.bench.compiled import compiled_forward

    model.forward = compiled_forward(model)
    try:
        if not compile_seconds:
            began = time.perf_counter()
            _time_steps(model, cache, start, 1)  # its two warm-up steps compile the steady step
            compile_seconds.append(time.perf_counter() - began)
            start += 3
        return _time_steps(model, cache, start, steps)
    finally:
        del model.forward


def markdown_table(rows: list[dict]) -> str:
    compiled = bool(rows) and "momentkv_compiled_tokens_per_s" in rows[0]
    extra = " momentkv compiled tokens/s | compiled / eager |" if compiled else ""
    lines = ["| cached tokens | full tokens/s | momentkv tokens/s (budget) | speed-up | full KV MiB | momentkv KV MiB |"
             + extra, "|---|---|---|---|---|---|" + ("---|---|" if compiled else "")]
    for r in rows:
        line = (f"| {r['context']} | {r['full_tokens_per_s']:.1f} | {r['momentkv_tokens_per_s']:.1f} ({r['budget']}) | "
                f"{r['speedup']:.2f}x | {r['full_kv_bytes'] / 2**20:.0f} | {r['momentkv_kv_bytes'] / 2**20:.1f} |")
        if compiled:
            fast = r["momentkv_compiled_tokens_per_s"]
            line += f" {fast:.1f} | {fast / r['momentkv_tokens_per_s']:.2f}x |"
        lines.append(line)
    if compiled:
        lines += ["", f"Compilation (first context only, not in tokens/s): {rows[0]['compile_s']:.1f} s."]
    return "\n".join(lines)
