"""momentkv inside vLLM: a ``vllm.general_plugins`` entry point that bounds each request's generated KV.

Inactive unless a policy is given::

    vllm.LLM(model, enable_prefix_caching=False, additional_config={"momentkv": {"policy": "moment.yaml"}})
    vllm serve MODEL --no-enable-prefix-caching --additional-config '{"momentkv": {"policy": "moment.yaml"}}'
    MOMENTKV_VLLM_POLICY=moment.yaml            # or a JSON policy dict; additional_config wins over it

vLLM calls :func:`register` with no arguments once in every process (main, engine core, each worker). In
the main process it wraps ``EngineArgs.create_engine_config``: once the config exists, the policy is loaded
and checked against what the vLLM backend supports (:func:`check`), a refusal raising momentkv's
``PolicyError`` from ``vllm.LLM(...)`` itself, and the policy is put into the environment
(``MOMENTKV_VLLM_POLICY``) that the engine-core and worker processes inherit. In a process where that
variable is set, the attention backend is overridden (on the CPU ``CPU_ATTN`` by
:mod:`momentkv.integrations.vllm.backend`; on CUDA ``FLASH_ATTN`` and ``TRITON_ATTN`` by
:mod:`momentkv.integrations.vllm.cuda`, with one of them chosen for the engine when the user chose none), and
the attention layers report a KV-cache spec whose manager caps each request's blocks at what its context and
the budget need (:mod:`momentkv.integrations.vllm.blocks`), so the scheduler admits more requests. A layer
whose backend is not one of these refuses the spec, so a policy never silently goes unapplied.

Nothing here is imported by ``import momentkv``; this module imports vLLM only inside :func:`register`.
"""

from __future__ import annotations

import json
import os

from momentkv.errors import PolicyError

ENV = "MOMENTKV_VLLM_POLICY"
CONFIG_KEY = "momentkv"
BACKEND = "momentkv.integrations.vllm.backend.MomentKVCPUBackend"
# vLLM's CUDA backends the plugin overrides, by name, and the classes that override them.
CUDA_BACKENDS = {"FLASH_ATTN": "momentkv.integrations.vllm.cuda.MomentKVFlashBackend",
                 "TRITON_ATTN": "momentkv.integrations.vllm.cuda.MomentKVTritonBackend"}


def policy_source(additional_config=None):
    """The policy given to vLLM: ``additional_config["momentkv"]["policy"]``, else ``$MOMENTKV_VLLM_POLICY``
    (a built-in name, a path, or a JSON object); ``None`` when neither is given."""
    if isinstance(additional_config, dict) and CONFIG_KEY in additional_config:
        entry = additional_config[CONFIG_KEY]
        if not isinstance(entry, dict) or "policy" not in entry:
            raise PolicyError(f'additional_config["{CONFIG_KEY}"] must be {{"policy": NAME, PATH or a policy dict}}, '
                              f"got {entry!r}")
        return entry["policy"]
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    return json.loads(raw) if raw.startswith("{") or raw.startswith('"') else raw


def load(source):
    from momentkv.policy import load_policy

    return load_policy(source)


def unsupported(policy, num_layers: int) -> list[str]:
    """What the vLLM backend cannot run yet in ``policy`` (one line per feature; empty: it can)."""
    from momentkv.core.plan import build_plans
    from momentkv.prefill.base import KeepAll

    problems = []
    if not isinstance(policy.prefill, KeepAll):
        problems.append(f"prefill compressors ({type(policy.prefill).__name__}): the vLLM backend keeps the prompt whole")
    decode = policy.decode
    if decode is None:
        return problems
    plans = build_plans(policy, num_layers, [None] * num_layers)
    budgets = {p.budget for p in plans}
    if any(b is None for b in budgets):
        problems.append("uncompressed_layers: every layer must hold the same budget in vLLM (one seq_len per request)")
    if any(b is not None and not isinstance(b, int) for b in budgets):
        problems.append("ratio budgets: the vLLM backend needs a fixed budget in tokens")
    elif len(budgets - {None}) > 1:
        problems.append("per-layer budgets (a layer schedule): every layer must hold the same budget in vLLM")
    if decode.scope != "decode":
        problems.append(f"scope: {decode.scope}: the vLLM backend evicts generated tokens only (scope: decode)")
    if decode.granularity != "head":
        problems.append(f"granularity: {decode.granularity}: the vLLM backend ranks per KV head (granularity: head)")
    if decode.cadence != 1:
        problems.append(f"cadence: {decode.cadence}: the vLLM backend evicts one token per step (cadence: 1)")
    for s in decode.scorers:
        if s.query_window():
            problems.append(f"windowed scorers ({s.type}, a window of {s.query_window()} queries)")
        elif s.needs_attention and not s.every_step():
            problems.append(f"scorers that read attention only when ranking ({s.type})")
    return problems


def check(source, vllm_config=None, num_layers: int = 1):
    """Load ``source`` and refuse, with ``PolicyError`` naming each feature, what the vLLM backend cannot run
    (in the policy, and in ``vllm_config`` where given; without it, for a model of ``num_layers``). Returns
    the policy."""
    policy = load(source)
    problems = []
    if vllm_config is not None:
        from vllm.platforms import current_platform

        problems += _platform_problems(current_platform, vllm_config)
        model = vllm_config.model_config
        text = getattr(model, "hf_text_config", model.hf_config)
        num_layers = int(getattr(text, "num_hidden_layers", 1))
        if getattr(text, "sliding_window", None) is not None or "sliding_attention" in (getattr(text, "layer_types", None) or []):
            problems.append("models with sliding-window layers")
        if getattr(model, "use_mla", False):
            problems.append("multi-head latent attention (MLA) models")
        if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
            problems.append("prefix caching: pass enable_prefix_caching=False (vllm serve: --no-enable-prefix-caching)")
        if getattr(vllm_config.cache_config, "prefix_cache_retention_interval", 0) != 0:
            problems.append("prefix_cache_retention_interval other than 0 (the block cap reads the prefill boundary)")
        if str(getattr(vllm_config.cache_config, "cache_dtype", "auto")) != "auto":
            problems.append(f"kv_cache_dtype {vllm_config.cache_config.cache_dtype} (quantised KV)")
        if getattr(vllm_config, "speculative_config", None) is not None:
            problems.append("speculative decoding")
        par = vllm_config.parallel_config
        if par.tensor_parallel_size * par.pipeline_parallel_size > 1:
            problems.append("tensor or pipeline parallelism (not tested yet)")
    problems += unsupported(policy, num_layers)
    if problems:
        raise PolicyError([f"momentkv's vLLM backend does not support {p}" for p in problems])
    return policy


def _platform_problems(platform, vllm_config) -> list[str]:
    """Where the plugin's overrides would not run: a platform other than the CPU and CUDA, or on CUDA an
    attention backend the user chose that is not one of :data:`CUDA_BACKENDS`."""
    if platform.is_cpu():
        return []
    cuda = " and ".join(CUDA_BACKENDS)
    if not getattr(platform, "is_cuda", lambda: False)():
        return [f"the {platform.device_name} platform: the backend overrides vLLM's CPU attention backend and, on "
                f"CUDA, {cuda}, so a policy there would not apply"]
    attention = getattr(vllm_config, "attention_config", None)
    chosen = getattr(attention, "backend", None)
    if chosen is not None and chosen.name not in CUDA_BACKENDS:
        return [f"the {chosen.name} attention backend: on CUDA the plugin overrides {cuda} "
                "(choose one of them, or none)"]
    per_kind = getattr(attention, "backend_per_kind", None) or {}
    if any(b.name not in CUDA_BACKENDS for b in per_kind.values()):
        return [f"attention backends per KV-cache kind ({per_kind}): on CUDA the plugin overrides {cuda} only"]
    return []


def choose_cuda_backend(vllm_config) -> None:
    """On CUDA with no attention backend chosen, choose the one the plugin overrides: ``FLASH_ATTN`` for half
    precision on a GPU of compute capability 8.0 or more, ``TRITON_ATTN`` otherwise (FlashAttention takes float16
    and bfloat16 only, on Ampere and later). Left to vLLM, some GPUs would get FlashInfer, which the plugin does
    not cover."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = getattr(vllm_config, "attention_config", None)
    if not current_platform.is_cuda() or attention is None or attention.backend is not None:
        return
    half = vllm_config.model_config.dtype in (torch.float16, torch.bfloat16)
    capability = current_platform.get_device_capability()
    ampere = capability is not None and capability.major >= 8
    attention.backend = AttentionBackendEnum.FLASH_ATTN if half and ampere else AttentionBackendEnum.TRITON_ATTN


_EXPORTED: list[str] = []  # the value this process put into $MOMENTKV_VLLM_POLICY, if any


def _budget(vllm_config) -> int | None:
    """The policy's budget in this process; ``None`` when no policy is set (an engine without one)."""
    if not os.environ.get(ENV, "").strip():
        return None
    from momentkv.integrations.vllm.evicting import runtime

    return runtime(vllm_config).budget


def register_backend() -> None:
    """In this process: the attention backends overridden (the CPU's, or on CUDA :data:`CUDA_BACKENDS`), the
    block-capped KV spec registered and reported by the attention layers (:mod:`momentkv.integrations.vllm.blocks`)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend as _register

    from momentkv.integrations.vllm import blocks

    if current_platform.is_cuda():
        for name, path in CUDA_BACKENDS.items():
            _register(AttentionBackendEnum[name], path)
    else:
        _register(AttentionBackendEnum.CPU_ATTN, BACKEND)
    blocks.register_spec()
    blocks.install_spec(_budget)


def _forget_exported() -> None:
    """An engine built later in this process without a policy must not inherit the last one's."""
    if _EXPORTED and os.environ.get(ENV) == _EXPORTED[-1]:
        del os.environ[ENV]
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        for name in ("CPU_ATTN", *CUDA_BACKENDS):
            AttentionBackendEnum[name].clear_override()
    _EXPORTED.clear()


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_momentkv", False):
        return

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        _forget_exported()
        source = policy_source(config.additional_config)
        if source is not None:
            policy = check(source, config)
            if policy.decode is not None:
                choose_cuda_backend(config)
                os.environ[ENV] = json.dumps(source)  # the engine-core and worker processes inherit it
                _EXPORTED.append(os.environ[ENV])
                register_backend()  # for an engine run in this very process
        return config

    create_engine_config._momentkv = True
    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    """The ``vllm.general_plugins`` entry point (see the module docstring)."""
    _wrap_create_engine_config()
    if os.environ.get(ENV, "").strip():
        register_backend()
