"""momentkv's transformers path on held-out prompts: the side of the fidelity benchmark that vLLM is compared with.

    .venv/bin/python benchmarks/vllm/fidelity_reference.py MODEL_DIR OUT.json [--prompts 8] [--new-tokens 256]
        [--budget 64] [--top 5] [--prompts-only]

Held-out prompts of momentkv's prompt set (the first ``--prompts``), chat-templated with the model's tokenizer
(``add_generation_prompt=True``), greedy generation of ``--new-tokens`` tokens one prompt at a time, EOS ignored,
float32, SDPA; the full cache (the model unpatched), then ``moment.yaml`` and ``recency.yaml`` at ``--budget``
through ``momentkv.patch``, as ``tests/vllm/make_reference.py`` does. Writes the prompts' token ids and, per
case and prompt, the tokens, the chosen tokens' log-probabilities (raw logits, log-softmax over the vocabulary)
and each step's top ``--top`` log-probabilities as [[token, logprob], ...]. The file is rewritten after each
prompt, so an interrupted run leaves what it finished. ``--prompts-only`` writes the prompts' ids and token ids
and stops (the vLLM side's prompts, so both sides see the same token ids).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def prompt_ids(tokenizer, count: int) -> tuple[list[str], list[list[int]]]:
    from momentkv.eval.prompts import load_prompts

    records = load_prompts(split="heldout")[:count]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True,
                                           tokenize=False) for r in records]
    return [r.id for r in records], [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def cases(budget: int) -> dict:
    return {
        "full": None,
        "moment": {"extends": "moment.yaml", "decode": {"budget": budget}},
        "recency": {"extends": "recency.yaml", "decode": {"budget": budget}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--prompts-only", action="store_true")
    args = parser.parse_args()

    if args.prompts_only:
        from transformers import AutoTokenizer

        ids, prompts = prompt_ids(AutoTokenizer.from_pretrained(args.model_dir), args.prompts)
        with open(args.out, "w") as f:
            json.dump({"prompt_ids": ids, "prompts": prompts}, f)
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import momentkv

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: generate every token
    model.generation_config.pad_token_id = tokenizer.pad_token_id or 0
    ids, prompts = prompt_ids(tokenizer, args.prompts)
    result = {"prompt_ids": ids, "prompts": prompts, "new_tokens": args.new_tokens, "budget": args.budget,
              "torch_threads": torch.get_num_threads(), "cases": {}}
    started = time.perf_counter()
    for name, policy in cases(args.budget).items():
        handle = momentkv.patch(model, policy) if policy is not None else None
        case = result["cases"][name] = {"policy": policy, "outputs": [], "seconds": []}
        try:
            for pid, prompt in zip(ids, prompts):
                tick = time.perf_counter()
                input_ids = torch.tensor([prompt])
                with torch.no_grad():
                    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         do_sample=False, max_new_tokens=args.new_tokens, output_logits=True,
                                         return_dict_in_generate=True)
                tokens = out.sequences[0, len(prompt):].tolist()
                chosen, steps = [], []
                for token, logits in zip(tokens, out.logits):
                    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                    top = logprobs.topk(args.top)
                    chosen.append(float(logprobs[token]))
                    steps.append([[int(t), float(v)] for t, v in zip(top.indices, top.values)])
                case["outputs"].append({"tokens": tokens, "chosen_logprobs": chosen, "top": steps})
                case["seconds"].append(round(time.perf_counter() - tick, 1))
                print(f"{name} {pid} ({len(prompt)} prompt tokens): {case['seconds'][-1]} s", flush=True)
                tmp = args.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(result, f)
                os.replace(tmp, args.out)
        finally:
            if handle is not None:
                handle.remove()
    result["seconds"] = round(time.perf_counter() - started, 1)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"done in {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
