"""The files of a saved evaluation: one reference per prompt set and length, one file per pass.

A reference folder holds::

    reference.json     what the reference is: model, steps, how tokens were chosen, the prompts (ids, kinds,
                       splits, token ids), suppressed ids, batch size, device, versions; written last, so a
                       folder without it holds no finished reference
    tokens.npy         (P, N) int64, the reference tokens
    logprobs.npy       (P, N, V) float32, the full cache's next-token log-probabilities (memory-mapped: at
                       N = 1024 and 28 prompts of SmolLM2 it is 5.6 GB)
    passes/LABEL.pt    one evaluated config: per-step KL, agreement and NLL (P, N), first eviction step (P,),
                       stored slots (P,), free-running tokens, its policy and its fingerprint

Pass files from other toolkits (``benchmarks/peers``) use the same fields, so one report merges them.
Torch, numpy and the standard library only: a peer's runner in another environment loads this file by path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

REFERENCE_META = "reference.json"
PASS_FIELDS = ("label", "name", "budget", "memory", "source", "fingerprint", "policy", "seconds", "device",
               "kl", "agree", "nll", "active_from", "slots", "generated_slots", "kv_bytes", "stored", "free_tokens",
               "error", "notes")


def pass_path(folder: Path, label: str) -> Path:
    """Where the pass ``label`` is saved (characters other than letters, digits, ``.-_@+`` become ``_``)."""
    return Path(folder) / "passes" / (re.sub(r"[^A-Za-z0-9.@+_-]", "_", label) + ".pt")


def read_meta(folder: Path) -> dict | None:
    """The reference's description, or None if ``folder`` holds no finished reference."""
    path = Path(folder) / REFERENCE_META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_meta(folder: Path, meta: dict) -> None:
    path = Path(folder) / REFERENCE_META
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader sees no reference or a whole one


def new_logprobs(folder: Path, shape: tuple[int, int, int]) -> tuple[np.memmap, torch.Tensor]:
    """A file-backed ``(P, N, V)`` float32 array to fill, and a tensor sharing its memory."""
    array = np.lib.format.open_memmap(Path(folder) / "logprobs.npy", mode="w+", dtype=np.float32, shape=shape)
    return array, torch.from_numpy(array)


def read_reference_arrays(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (P, N) int64, logprobs (P, N, V) float32)``; the log-probabilities stay on disk, mapped."""
    tokens = torch.from_numpy(np.load(Path(folder) / "tokens.npy"))
    # Copy-on-write mapping: pages are read on demand and the array is writable (torch wants that).
    logprobs = torch.from_numpy(np.load(Path(folder) / "logprobs.npy", mmap_mode="c"))
    return tokens, logprobs


def write_tokens(folder: Path, tokens: torch.Tensor) -> None:
    np.save(Path(folder) / "tokens.npy", tokens.cpu().numpy().astype(np.int64))


def write_pass(folder: Path, record: dict) -> Path:
    """Save one pass (a dict with :data:`PASS_FIELDS`); returns its path. Written atomically."""
    unknown = sorted(set(record) - set(PASS_FIELDS))
    if unknown:
        raise ValueError(f"unknown pass fields {unknown}")
    path = pass_path(folder, record["label"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: record.get(k) for k in PASS_FIELDS}, tmp)
    os.replace(tmp, path)
    return path


def read_pass(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def list_passes(folder: Path) -> list[Path]:
    return sorted((Path(folder) / "passes").glob("*.pt"))
