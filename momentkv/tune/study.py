"""The search: Optuna trials scored on the tune split at a cheap proxy, the winner confirmed on held-out prompts.

Each trial builds a policy from the search space (:mod:`momentkv.tune.space`) and replays the proxy
reference (fewer tokens, fewer prompts) teacher-forced under it. Policies are compared at equal peak memory:
a cadence ``c`` lets a policy hold ``decode.budget + c - 1`` tokens between evictions, so at ``--budget B``
its decode budget is ``B - (c - 1)``, for the trials and for the baselines of the confirmation alike. A
trial whose policy never evicted on the proxy prompts measured nothing and is pruned, with its reason.

Its objective is the mean over prompts of the KL to the full cache averaged over *all* steps, so every
trial is scored on the same steps (averaging from the first eviction on would favour policies that evict
later). After each batch of prompts the running mean is reported, and Optuna's median pruner stops a trial
that is already worse than the median of earlier trials at the same point. The sampler is TPE (Bergstra et al., NeurIPS 2011), seeded.

The study lives in an SQLite file in the output folder, and the references in a store beside it, so an
interrupted run resumes where it stopped: finished trials are kept, a trial cut off mid-way is marked
failed, and only the missing trials run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from momentkv.errors import PolicyError
from momentkv.eval.aggregate import bootstrap, relative_difference
from momentkv.eval.batches import make_batches
from momentkv.eval.configs import EvalConfig, build_configs, build_total_configs, policy_label, with_budget
from momentkv.eval.report import prompt_values
from momentkv.eval.replay import teacher_forced
from momentkv.eval.runner import run_eval
from momentkv.eval.store import SavedEvaluation
from momentkv.policy import load_policy
from momentkv.tune.space import SearchSpace, held_budget

STUDY_NAME = "momentkv-tune"


@dataclass
class Setup:
    """What a study searches for: fixed when the study is created, checked when it is resumed."""

    model_name: str
    budget: int
    memory: str  # "decode" or "total"
    proxy_tokens: int
    proxy_prompts: list[str]  # ids
    space: str  # the search space, as text
    seed: int
    # Every policy holds at most ``budget`` tokens (its decode budget is ``budget - (cadence - 1)``); a study
    # saved before this rule has no such field, and resuming it under the new rule is refused.
    peak_memory: bool = True

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class TuneInputError(PolicyError):
    """A study that cannot run as asked (e.g. an output folder holding another setup's study)."""


def open_study(out: Path, setup: Setup, seed: int):
    """Create the study in ``out/study.db``, or reopen it; a trial left running by a killed run is failed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=8),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0))
    saved = study.user_attrs.get("setup")
    if saved is None:
        study.set_user_attr("setup", setup.as_dict())
    elif saved != setup.as_dict():
        now = setup.as_dict()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise TuneInputError(f"{out} holds a study of another setup (different {', '.join(changed)}); "
                             "use another --out to start a new one")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # cut off by an interruption
    return study


def finished(study, pruned: bool = True) -> int:
    """Trials that ran to the end, and with ``pruned`` those stopped early too (a pruned trial has a value, the
    last one it reported, but is never the winner)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE,) + ((optuna.trial.TrialState.PRUNED,) if pruned else ())
    return len(study.get_trials(deepcopy=False, states=states))


def at_peak(source, peak: int, memory: str, prompt_lengths: list[int] = (), prompt_ids: list[str] | None = None
            ) -> EvalConfig:
    """The :class:`EvalConfig` of ``source`` (a built-in name, a path, a mapping or a Policy) holding at most
    ``peak`` tokens per layer and KV head: generated tokens (``memory="decode"``), or prompt and generated
    (``"total"``). Its decode budget is ``peak - (cadence - 1)`` (:func:`~momentkv.tune.space.held_budget`),
    its protections scaled to it; the config's budget and label name the peak, so that policies of every
    cadence line up. A policy without decode eviction is returned as it is. Raises :class:`PolicyError`."""
    policy = load_policy(source)
    name = policy_label(source, policy)
    if policy.decode is None:
        return build_configs([policy], None)[0]
    held = held_budget(peak, policy.decode.cadence)
    if memory == "total":
        config = build_total_configs([policy], [held], list(prompt_lengths), prompt_ids)[0]
        return dataclasses.replace(config, label=f"{name}@T{peak}", budget=peak)
    return EvalConfig(label=f"{name}@{peak}", name=name, budget=peak, policy=with_budget(policy, held))


def never_evicted(study) -> int:
    """Trials pruned because their policy never evicted on the proxy prompts."""
    import optuna

    return sum("never_evicted" in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))


def trial_config(space: SearchSpace, trial, setup: Setup, prompt_lengths: list[int]):
    """The :class:`EvalConfig` of a trial's policy at the study's peak memory (PolicyError if invalid)."""
    policy = space.policy(trial, setup.budget, name=f"trial{trial.number}")
    if setup.memory == "decode" and policy["decode"].get("scope", "decode") == "all":
        raise PolicyError("scope: all is searched at a total budget only (--total-budget)")
    return at_peak(policy, setup.budget, setup.memory, prompt_lengths)


def objective_fn(model, space: SearchSpace, setup: Setup, reference, encoded, pad_id: int, batch_size: int,
                 log=print):
    """The function Optuna minimises: mean over proxy prompts of the all-step KL, pruned batch by batch."""
    import optuna

    batches = make_batches(encoded, batch_size, pad_id, next(model.parameters()).device)
    lengths = [len(e) for e in encoded]
    steps = reference.tokens.shape[1]

    def objective(trial) -> float:
        try:
            config = trial_config(space, trial, setup, lengths)
        except PolicyError as err:
            trial.set_user_attr("invalid", str(err))
            log(f"trial {trial.number}: pruned, invalid policy ({err})")
            raise optuna.TrialPruned(str(err)) from None
        trial.set_user_attr("policy", config.policy.model_dump(mode="json"))
        started = time.perf_counter()
        per_prompt = []
        evicted = False
        for step, batch in enumerate(batches):
            m = teacher_forced(model, config.runnable, [batch], reference, label=config.label)
            per_prompt += m.kl[batch.rows].mean(dim=1).tolist()
            evicted = evicted or bool((m.active_from[batch.rows] < steps).any())
            trial.report(float(np.mean(per_prompt)), step)
            # After the last batch the value is complete: pruning it would only discard a finished trial.
            if step < len(batches) - 1 and trial.should_prune():
                log(f"trial {trial.number}: pruned after {len(per_prompt)} prompts (KL so far "
                    f"{np.mean(per_prompt):.4f})")
                raise optuna.TrialPruned()
        if not evicted:  # its KL of 0 says nothing about the policy: it is no result
            reason = (f"never evicted in {steps} tokens on the {len(per_prompt)} proxy prompts at "
                      f"{'total' if setup.memory == 'total' else 'decode'} budget {setup.budget}")
            trial.set_user_attr("never_evicted", reason)
            log(f"trial {trial.number}: pruned, {reason}")
            raise optuna.TrialPruned(reason)
        value = float(np.mean(per_prompt))
        log(f"trial {trial.number}: KL {value:.4f} ({time.perf_counter() - started:.0f} s)")
        return value

    return objective


def proxy_reference(model, store: SavedEvaluation, encoded, records, steps, suppressed, pad_id, batch_size, sampling):
    """The proxy reference, generated once and kept in the store (a resumed study reuses it)."""
    configs = build_configs(["full.yaml"], None)
    results = run_eval(model, encoded, records, configs, steps, suppressed, pad_id, batch_size=batch_size,
                       free_run=False, progress=False, sampling=sampling, store=store)
    reference = store.load_reference()
    return reference, results


def confirm(model, winner: dict, setup: Setup, heldout_records, heldout_encoded, steps, suppressed, pad_id,
            batch_size, sampling, store_root: Path, baselines: list[str], seed: int, log=print):
    """The winner and the baselines on the held-out prompts at the full length: results and a summary dict."""
    lengths = [len(e) for e in heldout_encoded]
    ids = [r.id for r in heldout_records]
    configs = build_configs(["full.yaml"], None)
    configs += [at_peak(source, setup.budget, setup.memory, lengths, ids) for source in (winner, *baselines)]
    labels = [c.label for c in configs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise PolicyError(f"two policies share the name(s) {', '.join(dupes)}; give each policy a distinct 'name'")
    if setup.memory == "total":
        batch_size = 1 if any(c.prompt_policies is not None for c in configs) else batch_size
    store = SavedEvaluation.under(store_root, setup.model_name, steps, sampling, heldout_records, heldout_encoded,
                                  suppressed, batch_size)
    results = run_eval(model, heldout_encoded, heldout_records, configs, steps, suppressed, pad_id,
                       batch_size=batch_size, seed=seed, free_run=False, progress=False, sampling=sampling,
                       store=store, log=log)
    by_name = {r.config.name: r for r in results.results}
    best = by_name[winner["name"]]
    best_kl = prompt_values(best, "kl", "active")
    summary = {"policy": winner["name"], "budget": setup.budget, "memory": setup.memory, "steps": steps,
               "decode_budget": winner["decode"]["budget"], "cadence": winner["decode"].get("cadence", 1),
               "prompts": len(heldout_records), "kl_active": bootstrap(best_kl, seed).__dict__, "versus": {}}
    for name in baselines:
        label = Path(name).stem if isinstance(name, str) else name["name"]
        other = by_name.get(label)
        if other is None:
            continue
        rel = relative_difference(best_kl, prompt_values(other, "kl", "active"), seed)
        summary["versus"][label] = {"kl_active": bootstrap(prompt_values(other, "kl", "active"), seed).__dict__,
                                    "relative": rel.__dict__}
    return results, summary


def trials_table(study, limit: int = 15) -> str:
    """The best finished trials, best first, with their policies in one line."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    done.sort(key=lambda t: t.value)
    lines = ["| trial | KL (proxy, all steps) | policy |", "| --- | --- | --- |"]
    for t in done[:limit]:
        lines.append(f"| {t.number} | {t.value:.4f} | `{json.dumps(t.user_attrs.get('policy', {}).get('decode'))}` |")
    return "\n".join(lines)


def to_tensor_free(summary: dict) -> dict:
    """``summary`` with every number a plain float and every NaN or infinity None (JSON has neither: an
    estimate with no prompt to average, such as a KL over steps with eviction where none evicted, is null)."""
    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.floating, torch.Tensor)):
            x = float(x)
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if x is None or isinstance(x, (str, int, bool)):
            return x
        return str(x)

    return clean(summary)


def summary_json(summary: dict) -> str:
    """``summary`` as JSON text; raises ValueError rather than write a NaN, which is not JSON."""
    return json.dumps(to_tensor_free(summary), indent=1, allow_nan=False)
