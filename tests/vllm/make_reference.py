"""momentkv's transformers path on the converted SmolLM2: the reference the vLLM backend is compared with.

    .venv/bin/python tests/vllm/make_reference.py MODEL_DIR OUT.json

Runs in momentkv's own environment (transformers >= 5.24; the transformers path does not run under vLLM's
5.19, see docs/vllm.md). For each policy of ``CASES`` and each prompt of ``QUESTIONS`` (chat-templated,
different lengths), greedy generation of ``NEW_TOKENS`` tokens one prompt at a time, float32, SDPA, with the
model patched by ``momentkv.patch``; writes the prompts' token ids and, per case and prompt, the tokens and
each step's top ``TOP`` log-probabilities (raw logits, log-softmax over the vocabulary). EOS does not stop
generation (vLLM is run with ``ignore_eos=True``).
"""

from __future__ import annotations

import json
import sys

QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue, for a ten-year-old who asks a lot of questions.",
    "Hi!",
]
NEW_TOKENS = 40
TOP = 20
BUDGET = 6
CASES = {
    "recency": {"extends": "recency.yaml", "decode": {"budget": BUDGET}},
    "moment": {"extends": "moment.yaml", "decode": {"budget": BUDGET}},
    "h2o": {"extends": "h2o.yaml", "decode": {"budget": BUDGET}},
}


def main() -> None:
    model_dir, out_path = sys.argv[1:3]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import momentkv

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: generate all NEW_TOKENS
    model.generation_config.pad_token_id = tokenizer.pad_token_id or 0
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    result = {"prompts": prompts, "new_tokens": NEW_TOKENS, "cases": {}}
    for name, policy in CASES.items():
        handle = momentkv.patch(model, policy)
        outputs = []
        try:
            for prompt in prompts:
                ids = torch.tensor([prompt])
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
                tokens = out.sequences[0, len(prompt):].tolist()
                steps = []
                for logits in out.logits:
                    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                    top = logprobs.topk(TOP)
                    steps.append([[int(t), float(v)] for t, v in zip(top.indices, top.values)])
                stats = handle.stats()
                outputs.append({"tokens": tokens, "logprobs": steps, "stats": str(stats)[:500]})
        finally:
            handle.remove()
        result["cases"][name] = {"policy": policy, "outputs": outputs}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
