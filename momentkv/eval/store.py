"""A saved evaluation that later runs continue (``momentkv eval --store DIR``).

The reference is generated once per model, prompt set (ids and token ids), length, token choice and batch
size, and saved in its own folder under ``DIR``; each config's passes are saved there as they finish, one
file per policy and budget. A rerun loads the reference and every pass whose policy is unchanged (same
fingerprint) and computes only the rest, so a long leaderboard run can be stopped and continued in another
process, on another day, or on another machine (the file format: :mod:`momentkv.eval.passfile`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from pathlib import Path

import torch

from momentkv.eval import passfile
from momentkv.eval.configs import EvalConfig
from momentkv.eval.freerun import free_run_of
from momentkv.eval.prompts import PromptRecord
from momentkv.eval.full_cache_reference import Reference
from momentkv.eval.replay import StepMetrics
from momentkv.eval.sampling import Sampling


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _sampling_dict(sampling: Sampling | None) -> dict | None:
    return None if sampling is None else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                          "seed": sampling.seed}


def config_fingerprint(config: EvalConfig, free_run: bool) -> str:
    """What decides a pass's numbers besides the reference: its policy (per prompt) and whether it ran free."""
    policies = config.prompt_policies or (config.policy,)
    return _digest({"memory": config.memory, "budget": config.budget, "free_run": free_run,
                    "policies": [p.model_dump(mode="json") for p in policies]})[:16]


class SavedEvaluation:
    """One reference folder: its reference, and the passes saved against it."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = key

    @classmethod
    def under(cls, root, model_name: str, steps: int, sampling: Sampling | None, records: list[PromptRecord],
              encoded: list[list[int]], suppressed: list[int], batch_size: int) -> "SavedEvaluation":
        """The folder under ``root`` for this reference (created if missing)."""
        key = {"model": model_name, "steps": steps, "sampling": _sampling_dict(sampling),
               "prompts": [{"id": r.id, "tokens": e} for r, e in zip(records, encoded)],
               "suppressed": sorted(suppressed), "batch_size": batch_size}
        mode = "greedy" if sampling is None else f"T{sampling.temperature:g}-p{sampling.top_p:g}-s{sampling.seed}"
        slug = re.sub(r"[^A-Za-z0-9.-]", "_", Path(model_name).name)
        folder = Path(root) / f"{slug}-N{steps}-P{len(records)}-{mode}-{_digest(key)[:10]}"
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, key)

    # ------------------------------------------------------------------ the reference
    def load_reference(self) -> Reference | None:
        meta = passfile.read_meta(self.folder)
        if meta is None:
            return None
        if meta["key"] != self.key:
            raise RuntimeError(f"{self.folder} holds a different reference (its reference.json does not match)")
        tokens, logprobs = passfile.read_reference_arrays(self.folder)
        sampling = None if meta["key"]["sampling"] is None else Sampling(**meta["key"]["sampling"])
        return Reference(tokens=tokens, logprobs=logprobs, suppressed=meta["key"]["suppressed"], sampling=sampling,
                         prompt_ids=[p["id"] for p in meta["key"]["prompts"]])

    def logprobs_buffer(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """A file-backed tensor for the reference's log-probabilities to be written into."""
        self._array, tensor = passfile.new_logprobs(self.folder, shape)
        return tensor

    def save_reference(self, reference: Reference, records: list[PromptRecord], seconds: float, device: str) -> None:
        import transformers

        passfile.write_tokens(self.folder, reference.tokens)
        if getattr(self, "_array", None) is not None:
            self._array.flush()
        meta = {"key": self.key, "records": [r.__dict__ for r in records], "seconds": seconds, "device": device,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                "transformers": transformers.__version__, "machine": platform.machine(),
                "vocab": int(reference.logprobs.shape[-1])}
        passfile.write_meta(self.folder, meta)

    def records(self) -> list[PromptRecord]:
        meta = passfile.read_meta(self.folder)
        return [PromptRecord(**r) for r in meta["records"]]

    # ------------------------------------------------------------------ passes
    def load_pass(self, config: EvalConfig, free_run: bool, reference_tokens: torch.Tensor):
        """The saved :class:`ConfigResult` of ``config`` if it was run with the same policy, else None."""
        from momentkv.eval.runner import ConfigResult

        path = passfile.pass_path(self.folder, config.label)
        if not path.is_file():
            return None
        record = passfile.read_pass(path)
        if record.get("fingerprint") != config_fingerprint(config, free_run):
            return None
        return ConfigResult(config=config, metrics=metrics_of(record), seconds=record["seconds"],
                            free=None if record["free_tokens"] is None
                            else free_run_of(record["free_tokens"].long(), reference_tokens.cpu()))

    def save_pass(self, result, free_run: bool, device: str) -> Path:
        m = result.metrics
        return passfile.write_pass(self.folder, {
            "label": result.config.label, "name": result.config.name, "budget": result.config.budget,
            "memory": result.config.memory, "source": "momentkv",
            "fingerprint": config_fingerprint(result.config, free_run),
            "policy": result.config.policy.model_dump(mode="json"), "seconds": result.seconds, "device": device,
            "kl": m.kl, "agree": m.agree, "nll": m.nll, "active_from": m.active_from, "slots": m.slots,
            "generated_slots": m.generated_slots, "kv_bytes": m.kv_bytes, "stored": m.stored,
            "free_tokens": None if result.free is None else result.free.tokens.to(torch.int32),
            "error": None, "notes": None})


def metrics_of(record: dict) -> StepMetrics:
    """The :class:`StepMetrics` of a saved pass."""
    return StepMetrics(kl=record["kl"].double(), agree=record["agree"].bool(), nll=record["nll"].double(),
                       active_from=record["active_from"].long(), kv_bytes=record.get("kv_bytes") or 0,
                       stored=record.get("stored") or 0,
                       slots=None if record.get("slots") is None else record["slots"].double(),
                       generated_slots=None if record.get("generated_slots") is None
                       else record["generated_slots"].double())


def load_saved(folder, seed: int = 0) -> tuple:
    """Every pass saved in the reference folder ``folder`` (momentkv's and peer toolkits'), as results.

    Returns ``(results, failures)``: ``failures`` lists the passes saved with an error instead of numbers
    (``{"label", "source", "error"}``). Passes are ordered as saved: the full cache first, then by label.
    """
    from momentkv.eval.runner import ConfigResult, EvalResults

    folder = Path(folder)
    meta = passfile.read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} holds no finished reference (reference.json is missing)")
    tokens, logprobs = passfile.read_reference_arrays(folder)
    sampling = meta["key"]["sampling"]
    reference = Reference(tokens=tokens, logprobs=logprobs, suppressed=meta["key"]["suppressed"],
                          sampling=None if sampling is None else Sampling(**sampling))
    from momentkv.eval.repetition import REPETITION_N, repetition_per_prompt
    from momentkv.eval.runner import reference_nll

    results = EvalResults(records=[PromptRecord(**r) for r in meta["records"]], steps=meta["key"]["steps"],
                          seed=seed, model_name=meta["key"]["model"], reference_tokens=tokens,
                          reference_nll=reference_nll(reference),
                          meta={"batch_size": meta["key"]["batch_size"], "reference_seconds": meta["seconds"],
                                "device": meta["device"], "repetition_n": REPETITION_N,
                                "reference": "greedy" if sampling is None else Sampling(**sampling).describe()},
                          reference_repetition=repetition_per_prompt(tokens),
                          prompt_lengths=[len(p["tokens"]) for p in meta["key"]["prompts"]])
    failures = []
    records = [passfile.read_pass(path) for path in passfile.list_passes(folder)]
    records.sort(key=lambda r: (r["budget"] is not None, r.get("source") != "momentkv", r["label"]))
    for record in records:
        if record.get("error"):
            failures.append({"label": record["label"], "source": record.get("source"), "error": record["error"]})
            continue
        policy = None
        if record.get("policy") is not None:
            from momentkv.policy import load_policy

            policy = load_policy(record["policy"])
        config = EvalConfig(label=record["label"], name=record["name"], budget=record["budget"], policy=policy,
                            memory=record.get("memory") or "decode")
        free = None if record.get("free_tokens") is None else free_run_of(record["free_tokens"].long(), tokens)
        results.results.append(ConfigResult(config=config, metrics=metrics_of(record), free=free,
                                            seconds=record["seconds"]))
    return results, failures
