"""Fidelity of prefill compressors to the full cache on SmolLM2-135M-Instruct (CPU, offline).

For each prompt (a passage followed by questions about it), the full-cache model generates ``--tokens``
tokens greedily. Each policy is then teacher-forced on that output, and the script reports the mean
KL(full || policy) of the next-token distributions and the top-1 agreement with the full cache. The first
generated token comes from the prompt's own forward pass, before any compression, so it is identical for
every policy and left out of the means.

Policies: each compressor alone (decode: null, every generated token kept) at each capacity, and, at the
same total memory (capacity + generated tokens), whole-cache TOVA and whole-cache recency (scope: all).

    nice -n 10 python benchmarks/prefill_fidelity.py --capacities 128 256 --tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import momentkv
from momentkv.models import chat_prompt, load

PASSAGES = [
    (
        "The village of Marrow Creek was founded in 1843 by eleven families who left the coastal town of Ashby "
        "after a fire destroyed the harbour. They chose the valley because the creek never froze: a warm spring "
        "rises two miles upstream, near the place later called Kettle Rock. The first building was a grist mill, "
        "built by Tobias Wren, whose daughter Eliza kept the mill's accounts for forty years. In 1871 a wooden "
        "bridge replaced the ford, and the village grew to about six hundred people. The railway arrived in "
        "1889, but the station was placed three miles east, at Lindell Junction, because the valley floor was "
        "too soft for the embankment. Trade moved to the junction and Marrow Creek shrank to two hundred people "
        "by 1910. The mill closed in 1923 after a flood broke its wheel. In 1952 the county built a stone bridge "
        "and a school, and the village slowly recovered. Today about nine hundred people live there; the old "
        "mill is a museum that displays Eliza Wren's ledgers, and the warm spring feeds a public bath house "
        "that opened in 1998. Every October the village holds the Lantern Walk, which commemorates the night "
        "of the 1923 flood, when residents carried lanterns to guide families across the creek to higher ground.",
        [
            "Why did the founders choose the valley?",
            "Who kept the mill's accounts, and for how long?",
            "Why was the railway station built at Lindell Junction instead of in the village?",
            "What happened to the population between 1889 and 1910, and why?",
            "What does the Lantern Walk commemorate?",
        ],
    ),
    (
        "To prepare the buffer for the enzyme assay, dissolve 6.05 grams of Tris base in 800 millilitres of "
        "distilled water. Adjust the pH to 7.4 at room temperature by adding hydrochloric acid slowly while "
        "stirring; the pH of Tris changes with temperature, so do not adjust it on ice. Add 8.77 grams of "
        "sodium chloride and 0.2 grams of magnesium chloride, then bring the volume to one litre. Filter the "
        "buffer through a 0.22 micrometre membrane and store it at 4 degrees for no more than two weeks. On the "
        "day of the assay, thaw the enzyme on ice and dilute it one hundred fold in cold buffer; the diluted "
        "enzyme loses half of its activity in about three hours, so prepare it within thirty minutes of use. "
        "Warm the substrate solution to 30 degrees for ten minutes before starting. Start each reaction by "
        "adding 10 microlitres of diluted enzyme to 190 microlitres of substrate, mix by pipetting twice, and "
        "read the absorbance at 405 nanometres every 30 seconds for ten minutes. Include a blank without "
        "enzyme in every plate, and run each sample in triplicate. Discard any triplicate whose readings differ "
        "by more than ten percent, and repeat it with freshly diluted enzyme.",
        [
            "At what temperature should the pH be adjusted, and why?",
            "How long can the buffer be stored?",
            "How quickly does the diluted enzyme lose activity, and what follows from that?",
            "How is each reaction started?",
            "What should be done with a triplicate whose readings disagree?",
        ],
    ),
    (
        "The Halden-3 weather station stands at 2,410 metres on the northern ridge of Mount Sever. It was "
        "installed in 2006 to replace Halden-2, which an avalanche buried in the winter of 2004. The station "
        "measures air temperature, humidity, wind speed and direction, snow depth and solar radiation every ten "
        "minutes. Power comes from two solar panels and a bank of lithium batteries that can run the station "
        "for nineteen days without sun. Data travel by radio to a relay at the Pasco hut, 900 metres lower, and "
        "from there by cable to the valley. In February 2015 the relay failed during a storm and six weeks of "
        "data were lost; since then the station also stores a full year of readings on a memory card. The "
        "record low temperature, minus 34.6 degrees, was measured on 9 January 2009; the strongest gust, 187 "
        "kilometres per hour, on 3 March 2019. Technicians visit twice a year, in June and in October, to clean "
        "the sensors and replace the humidity probe, which drifts by about two percent per year. A webcam was "
        "added in 2017; its images are used by mountain guides to judge the snow conditions before a climb.",
        [
            "Why was Halden-3 installed?",
            "How long can the station run without sun?",
            "What caused the data loss in 2015, and what changed afterwards?",
            "What are the two weather records mentioned?",
            "Why do technicians replace the humidity probe?",
        ],
    ),
]


def build_prompt(tokenizer, passage: str, questions: list[str]) -> str:
    numbered = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, start=1))
    text = f"Read the text and answer the questions in order, one short paragraph each.\n\n{passage}\n\n{numbered}"
    return chat_prompt(tokenizer, text)


@torch.no_grad()
def teacher_forced_logits(model, prompt_ids: torch.Tensor, continuation: torch.Tensor, policy, stepwise: bool):
    """Next-token logits ``(tokens, vocab)`` float32 along ``continuation`` and the tokens stored per layer.

    ``policy=None``: the unpatched model. Without decode eviction (``stepwise=False``) the cache is fixed
    once the first generated token has compressed the prompt, so the rest of the continuation is fed in
    one forward pass; a policy that evicts while decoding is fed one token at a time.
    """
    handle = momentkv.patch(model, policy) if policy is not None else None
    try:
        kwargs = {"cache": handle.new_cache()} if handle is not None else {}
        out = model(input_ids=prompt_ids, use_cache=True, **kwargs)
        cache = out.past_key_values
        logits = [out.logits[0, -1:].float()]
        chunks = continuation[:-1].view(-1, 1) if stepwise else [continuation[:1], continuation[1:-1]]
        for chunk in chunks:
            out = model(input_ids=chunk.view(1, -1), cache=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0].float())
        stored = handle.stats()["stored"] if handle is not None else None
        return torch.cat(logits), stored
    finally:
        if handle is not None:
            handle.remove()


def kl_and_agreement(full: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full || other) and top-1 agreement over steps 1.. (step 0 precedes any compression)."""
    logp, logq = full[1:].log_softmax(-1), other[1:].log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    agree = (full[1:].argmax(-1) == other[1:].argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def policies(capacities: list[int], tokens: int) -> list[tuple[str, int, dict, bool]]:
    """``(name, capacity, policy, stepwise)``; whole-cache policies get the compressors' final memory:
    ``capacity`` prompt tokens plus the ``tokens - 1`` generated tokens fed back."""
    out = []
    for cap in capacities:
        for kind in ("snapkv", "pyramidkv", "streamingllm", "knorm"):
            out.append((kind, cap, {"name": kind, "prefill": {"type": kind, "capacity": cap}}, False))
        for name, scorer in (("tova-all", "instantaneous"), ("recency-all", "recency")):
            decode = {"budget": cap + tokens - 1, "scope": "all", "scorers": [{"type": scorer}]}
            out.append((name, cap, {"name": name, "decode": decode}, True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load("smollm2")
    model.generation_config.eos_token_id = None  # a fixed number of tokens per prompt
    runs = []
    for passage, questions in PASSAGES:
        ids = tokenizer(build_prompt(tokenizer, passage, questions), return_tensors="pt").input_ids
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                   do_sample=False)[0, ids.shape[1]:]
        full, _ = teacher_forced_logits(model, ids, generated, None, stepwise=False)
        runs.append((ids, generated, full))
    lengths = [r[0].shape[1] for r in runs]
    print(f"prompt tokens: {lengths}; generated tokens: {args.tokens}; model: SmolLM2-135M-Instruct")
    print("| policy | capacity | stored per layer (mean) | KL(full || policy) | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    for name, cap, policy, stepwise in policies(args.capacities, args.tokens):
        kls, agrees, stored = [], [], []
        for ids, generated, full in runs:
            logits, total = teacher_forced_logits(model, ids, generated, policy, stepwise)
            kl, agree = kl_and_agreement(full, logits)
            kls.append(kl)
            agrees.append(agree)
            stored.append(total / model.config.num_hidden_layers)
        print(f"| {name} | {cap} | {sum(stored) / len(stored):.0f} | {sum(kls) / len(kls):.4f} | "
              f"{sum(agrees) / len(agrees):.3f} |", flush=True)
    print(f"elapsed: {time.time() - start:.0f} s wall, {time.process_time():.0f} s CPU")


if __name__ == "__main__":
    main()
