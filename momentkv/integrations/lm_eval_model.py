"""``momentkv``, a model of lm-evaluation-harness: its ``hf`` model with a momentkv policy patched in.

Importing this module registers the model (lm-eval has no plugin discovery, so ``momentkv lm-eval`` imports it
before handing its arguments to lm-eval's command line). The policy is resolved before the model is loaded,
so a bad ``policy=``, ``budget=`` or ``import=`` argument stops the run before any model work; the model is
patched once lm-eval has loaded it and placed it on its device.

Only ``generate_until`` requests decode, so only they meet eviction: a ``loglikelihood`` request is one
forward pass over the prompt and its continuation, which is all context, and scores exactly as the full
cache does. A run without ``generate_until`` requests therefore measures nothing about the policy, and the
model warns once when it ends so.

The results' ``config.momentkv`` records the resolved policy (as ``momentkv show`` would dump it), the
arguments that produced it, the request counts and the cache statistics summed over the run.
"""

from __future__ import annotations

import inspect
import warnings

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import momentkv
from momentkv.integrations.generation_tally import GenerationTally
from momentkv.integrations.lm_eval_args import embedded_model_args, pop_args
from momentkv.policy import policy_to_data

MODEL_NAME = "momentkv"
# The arguments lm-eval's ``hf`` model names (a near miss of one is refused with "did you mean").
HF_ARGS = tuple(name for name, p in inspect.signature(HFLM.__init__).parameters.items()
                if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
NO_GENERATION_WARNING = (
    "momentkv: this run had no generate_until request; loglikelihood requests are one forward pass over "
    "context with nothing decoded, so eviction never acted and the scores are those of the full cache; "
    "evaluate a policy on generate_until tasks (e.g. the momentkv_long group)"
)


@register_model(MODEL_NAME)
class MomentKVLM(HFLM):
    """lm-eval's ``HFLM`` with ``momentkv.patch(model, policy)`` applied after loading.

    Arguments are those of ``HFLM`` plus ``policy``, ``budget`` and ``import`` (see
    :mod:`momentkv.integrations.lm_eval_args`); ``pretrained="smollm2"`` loads the embedded SmolLM2-135M.
    """

    def __init__(self, pretrained="smollm2", **kwargs) -> None:
        self.momentkv_args = pop_args(kwargs, HF_ARGS)  # PolicyError here, before anything is loaded
        pretrained, kwargs = embedded_model_args(pretrained, kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        self.handle = momentkv.patch(self.model, self.momentkv_args.policy)
        self.tally = GenerationTally()
        self.request_counts = {"generate_until": 0, "loglikelihood": 0, "loglikelihood_rolling": 0}
        self._warned = False

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        before = self.handle.last_cache
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        cache = self.handle.last_cache
        if cache is not None and cache is not before:
            self.tally.add(cache.stats(), [plan.cadence for plan in self.handle.plans], int(context.shape[0]))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.request_counts["generate_until"] += len(requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.request_counts["loglikelihood"] += len(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self.request_counts["loglikelihood_rolling"] += len(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def momentkv_info(self) -> dict:
        """What the results record under ``config.momentkv``; warns once if nothing was decoded."""
        if self.request_counts["generate_until"] == 0 and not self._warned:
            self._warned = True
            warnings.warn(NO_GENERATION_WARNING, UserWarning, stacklevel=2)
        args = self.momentkv_args
        return {
            "policy_source": args.source,
            "budget_override": args.budget,
            "imports": list(args.imports),
            "policy": policy_to_data(args.policy),
            "requests": dict(self.request_counts),
            "stats": self.tally.summary(),
        }

    def get_model_info(self) -> dict:
        """lm-eval's model information plus ``momentkv`` (called once a run has finished)."""
        return {**super().get_model_info(), "momentkv": self.momentkv_info()}
