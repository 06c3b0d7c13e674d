"""``momentkv demo``: a long answer generated with the full cache and with ``moment.yaml``, side by side.

Both runs sample from one seeded stream of random numbers (temperature 0.7, top-p 0.95 by default, as the
leaderboard's references): where the policy's next-token distribution equals the full cache's, it draws the
same token, so the two texts stay identical until eviction changes what the model would say. Greedy decoding
of a small model tends to loop (``--greedy`` shows it). Shows both texts, tokens per second, the stored KV
cache of each, how long the texts agree and how much each repeats itself. End-of-sequence is suppressed so
that both runs generate exactly ``--new-tokens`` tokens.
"""

from __future__ import annotations

import sys
import textwrap
import time

DEMO_PROMPT = (
    "Write a detailed guide to planning a week-long hiking trip in the mountains: choosing the route, "
    "training beforehand, packing food, water and gear, checking the weather, staying safe, and what to do "
    "each day of the week. Use headings and numbered lists."
)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate a long answer with the full cache and with moment.yaml",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=512, help="tokens to generate (default 512)")
    p.add_argument("--policy", default="moment.yaml", help="the policy compared with the full cache")
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline, default), a local path or a hub id")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the user message (default: a built-in prompt)")
    p.add_argument("--width", type=int, default=100, help="wrap the shown text at this width")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass kept when sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random numbers both runs share (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.set_defaults(func=run)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def generate(model, handle, input_ids, steps: int, chooser, desc: str):
    """``steps`` tokens under ``handle``'s policy, each chosen by ``chooser`` (a
    :class:`~momentkv.eval.sampling.TokenChooser`); return (tokens, seconds, stats)."""
    import torch
    from tqdm.auto import tqdm

    from momentkv.eval.stepping import run_steps

    tokens = []
    cache = handle.new_cache()
    mask = torch.ones_like(input_ids)
    started = time.perf_counter()
    with tqdm(total=steps, unit="tok", desc=desc, dynamic_ncols=True) as bar:
        for step, logits, _ in run_steps(model, cache, input_ids, mask, steps, lambda s, _: tokens[s]):
            tokens.append(chooser.choose(step, logits, [0]))
            bar.update(1)
    seconds = time.perf_counter() - started
    return torch.cat(tokens).tolist(), seconds, cache.stats()


def run(args) -> int:
    import momentkv
    from momentkv import models
    from momentkv.errors import PolicyError
    from momentkv.eval.freerun import compare
    from momentkv.eval.repetition import REPETITION_N, repeated_ngram_share
    from momentkv.eval.sampling import Sampling, TokenChooser

    if args.new_tokens <= 0:
        print(f"momentkv demo: error: --new-tokens must be positive, got {args.new_tokens}", file=sys.stderr)
        return 2
    try:
        sampling = None if args.greedy else Sampling(args.temperature, args.top_p, args.seed)
        policy = momentkv.load_policy(args.policy)
        print(f"loading {args.model} ...", file=sys.stderr)
        model, tokenizer = models.load(args.model)
    except PolicyError as err:
        print(f"momentkv demo: error: {err}", file=sys.stderr)
        return 2
    import torch

    text = models.chat_prompt(tokenizer, args.prompt)
    input_ids = torch.tensor([list(tokenizer(text, add_special_tokens=False)["input_ids"])])  # (1, prompt)
    chooser = TokenChooser(models.eos_token_ids(model, tokenizer), sampling, ["demo"], args.new_tokens)
    runs = {}
    for label, source in (("full cache", "full.yaml"), (policy.name, policy)):
        with momentkv.patched(model, source) as handle:
            runs[label] = generate(model, handle, input_ids, args.new_tokens, chooser, label)
    (full_tokens, full_s, full_stats), (pol_tokens, pol_s, pol_stats) = runs.values()
    first, fraction = compare(torch.tensor([pol_tokens]), torch.tensor([full_tokens]))
    print(f"\nprompt ({input_ids.shape[1]} tokens): {args.prompt}")
    print(f"decoding: {chooser.describe()}, the same random numbers for both runs\n")
    for label, (tokens, seconds, stats) in runs.items():
        body = tokenizer.decode(tokens, skip_special_tokens=True)
        print(f"===== {label} =====")
        print("\n".join(textwrap.fill(p, args.width) if p.strip() else "" for p in body.split("\n")))
        print()
    budget = policy.decode.budget if policy.decode is not None else None
    print("===== summary =====")
    print(f"{'':14}{'tokens/s':>10}{'stored tokens/layer':>22}{'stored KV':>12}{f'rep-{REPETITION_N}':>8}")
    for label, (tokens, seconds, stats) in runs.items():
        per_layer = stats["stored"] // max(len(stats["layers"]), 1)
        print(f"{label:14}{len(tokens) / seconds:>10.1f}{per_layer:>22d}{_fmt_bytes(stats['kv_bytes']):>12}"
              f"{repeated_ngram_share(tokens):>8.2f}")
    print(f"\n{policy.name} (decode budget {budget}) kept {_fmt_bytes(pol_stats['kv_bytes'])} of KV against "
          f"{_fmt_bytes(full_stats['kv_bytes'])} for the full cache ({pol_stats['kv_bytes'] / full_stats['kv_bytes']:.0%}).")
    print(f"agreement: the first {int(first[0])} of {args.new_tokens} tokens are identical; "
          f"{float(fraction[0]):.0%} of positions hold the same token.")
    print(textwrap.fill(f"The runs share their random numbers, so they part only where eviction changed the model's next-token "
          f"distribution; after that each text follows its own course, and positional agreement is low for any "
          f"policy. rep-{REPETITION_N} is the share of {REPETITION_N}-token phrases that repeat an earlier one "
          f"(near 1: a loop). How close each policy stays to the full cache, measured over many prompts: "
          f"docs/leaderboard.md.", args.width))
    return 0
