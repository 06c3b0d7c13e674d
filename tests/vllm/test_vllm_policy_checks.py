"""What the vLLM backend refuses, named at start-up (``momentkv.integrations.vllm.check``); no engine runs.

``check`` imports no vLLM, but this file lives with the vLLM tests and runs in ``.venv-vllm``.
"""

from __future__ import annotations

import json

import pytest

from vllm_cases import vllm_distribution  # noqa: E402

if vllm_distribution() is None:
    pytest.skip("vLLM is not installed here: make test-vllm runs this in .venv-vllm", allow_module_level=True)

from momentkv.errors import PolicyError
from momentkv.integrations.vllm import ENV, check, policy_source


@pytest.mark.parametrize("policy", ["recency.yaml", "moment.yaml", "h2o.yaml", "keydiff.yaml", "raas.yaml",
                                    {"extends": "moment.yaml", "decode": {"budget": 8, "sinks": 2, "recent": 2}}])
def test_policies_it_runs(policy):
    check(policy)


@pytest.mark.parametrize("policy, feature", [
    ("tova.yaml", "granularity: layer"),
    ("moment-all.yaml", "scope: all"),
    ("snapkv-moment.yaml", "prefill compressors (SnapKV)"),
    ("rkv.yaml", "cadence: 128"),
    ("rkv.yaml", "windowed scorers"),
    ({"extends": "moment.yaml", "decode": {"budget": {"ratio": 0.5, "floor": 16}}}, "ratio budgets"),
    ({"extends": "moment.yaml", "decode": {"budget": [8, 16]}}, "per-layer budgets"),
    ({"extends": "moment.yaml", "decode": {"uncompressed_layers": [0]}}, "uncompressed_layers"),
])
def test_what_it_refuses_is_named(policy, feature):
    with pytest.raises(PolicyError) as error:
        check(policy, num_layers=30)
    assert f"momentkv's vLLM backend does not support {feature}" in str(error.value)


def test_the_policy_comes_from_additional_config_then_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert policy_source(None) is None and policy_source({}) is None
    assert policy_source({"momentkv": {"policy": "h2o.yaml"}}) == "h2o.yaml"
    monkeypatch.setenv(ENV, json.dumps({"extends": "recency.yaml"}))
    assert policy_source({}) == {"extends": "recency.yaml"}
    assert policy_source({"momentkv": {"policy": "h2o.yaml"}}) == "h2o.yaml"  # the config wins
    monkeypatch.setenv(ENV, "moment.yaml")
    assert policy_source(None) == "moment.yaml"
    with pytest.raises(PolicyError, match="policy"):
        policy_source({"momentkv": "moment.yaml"})


def _config(**cache):
    from types import SimpleNamespace as NS

    text = NS(num_hidden_layers=2)
    return NS(model_config=NS(hf_text_config=text, hf_config=text),
              cache_config=NS(**{"enable_prefix_caching": False, "prefix_cache_retention_interval": 0,
                                 "cache_dtype": "auto", **cache}),
              speculative_config=None, parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1))


def test_an_engine_the_backend_does_not_cover_is_refused(monkeypatch):
    """On another platform the CPU backend's override would never run: the policy would silently not apply."""
    import vllm.platforms
    from types import SimpleNamespace as NS

    check("moment.yaml", _config())  # this CPU platform, vLLM's defaults: accepted
    mla = _config()
    mla.model_config.use_mla = True  # its layers are not the attention layers whose blocks the plugin caps
    with pytest.raises(PolicyError, match=r"multi-head latent attention \(MLA\) models"):
        check("moment.yaml", mla)
    with pytest.raises(PolicyError, match="prefix caching"):
        check("moment.yaml", _config(enable_prefix_caching=True))
    with pytest.raises(PolicyError, match="prefix_cache_retention_interval"):
        check("moment.yaml", _config(prefix_cache_retention_interval=None))
    monkeypatch.setattr(vllm.platforms, "current_platform",
                        NS(is_cpu=lambda: False, is_cuda=lambda: False, device_name="rocm"))
    with pytest.raises(PolicyError, match="the rocm platform: the backend overrides vLLM's CPU attention backend and, "
                                          "on CUDA, FLASH_ATTN and TRITON_ATTN"):
        check("moment.yaml", _config())


def _on_cuda(monkeypatch, capability=(9, 0)):
    import vllm.platforms
    from types import SimpleNamespace as NS

    major, minor = capability
    monkeypatch.setattr(vllm.platforms, "current_platform",
                        NS(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda",
                           get_device_capability=lambda: NS(major=major, minor=minor)))


@pytest.mark.parametrize("chosen, refused", [(None, False), ("FLASH_ATTN", False), ("TRITON_ATTN", False),
                                             ("FLASHINFER", True), ("FLEX_ATTENTION", True)])
def test_on_cuda_an_attention_backend_it_does_not_override_is_refused(monkeypatch, chosen, refused):
    from types import SimpleNamespace as NS

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _on_cuda(monkeypatch)
    config = _config()
    config.attention_config = NS(backend=AttentionBackendEnum[chosen] if chosen else None, backend_per_kind={})
    if not refused:
        check("moment.yaml", config)
        return
    with pytest.raises(PolicyError, match=f"the {chosen} attention backend: on CUDA the plugin overrides "
                                          "FLASH_ATTN and TRITON_ATTN"):
        check("moment.yaml", config)


@pytest.mark.parametrize("dtype, capability, chosen, expected", [
    ("float32", (9, 0), None, "TRITON_ATTN"), ("bfloat16", (9, 0), None, "FLASH_ATTN"),
    ("float16", (8, 0), None, "FLASH_ATTN"), ("float16", (7, 5), None, "TRITON_ATTN"),
    ("float32", (9, 0), "FLASH_ATTN", "FLASH_ATTN")])
def test_on_cuda_the_engine_gets_a_backend_the_plugin_overrides(monkeypatch, dtype, capability, chosen, expected):
    """Left to vLLM, some GPUs would get FlashInfer, which the plugin does not cover; FlashAttention takes half
    precision only, on Ampere (8.0) and later. A backend the user chose stays."""
    from types import SimpleNamespace as NS

    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from momentkv.integrations.vllm import choose_cuda_backend

    config = NS(model_config=NS(dtype=getattr(torch, dtype)),
                attention_config=NS(backend=AttentionBackendEnum[chosen] if chosen else None))
    choose_cuda_backend(config)  # this CPU platform: nothing to choose
    assert config.attention_config.backend == (AttentionBackendEnum[chosen] if chosen else None)
    _on_cuda(monkeypatch, capability)
    choose_cuda_backend(config)
    assert config.attention_config.backend == AttentionBackendEnum[expected]


def test_the_cuda_backends_keep_keys_and_values_where_vllm_reads_them():
    """``FLASH_ATTN`` and ``TRITON_ATTN`` read a layer's cache as ``kv_cache.transpose(1, 2).split(head_size, -1)``
    (keys, then values, per token row); the eviction's views name the same elements, and a write through them
    lands where vLLM reads."""
    import torch

    from momentkv.integrations.vllm.cuda import split_row_major

    blocks, heads, block_size, head_size = 5, 3, 8, 16
    kv_cache = torch.randn(blocks, heads, block_size, 2 * head_size)
    keys, values = split_row_major(kv_cache, head_size)
    stock_keys, stock_values = kv_cache.transpose(1, 2).split(head_size, dim=-1)  # (blocks, block_size, heads, D)
    assert torch.equal(keys, stock_keys.transpose(1, 2)) and torch.equal(values, stock_values.transpose(1, 2))
    assert keys.data_ptr() == kv_cache.data_ptr()  # views, not copies
    new_key, new_value = torch.randn(heads, head_size), torch.randn(heads, head_size)
    keys[2, torch.arange(heads), 5] = new_key
    values[2, torch.arange(heads), 5] = new_value
    stock_keys, stock_values = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    assert torch.equal(stock_keys[2, 5], new_key) and torch.equal(stock_values[2, 5], new_value)
    with pytest.raises(ValueError, match="cannot hold"):
        split_row_major(kv_cache, 2 * head_size)


def test_on_cuda_the_plugin_registers_its_backends_over_vllms(monkeypatch):
    """Each overridden name resolves, through vLLM's own registry, to momentkv's backend for it: a subclass of the
    stock one that writes the cache itself, takes no fused cache write, declares no CUDA graphs, and keeps the
    stock name."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from momentkv.integrations.vllm import CUDA_BACKENDS, blocks, register_backend

    stock = {name: AttentionBackendEnum[name].get_class() for name in CUDA_BACKENDS}  # imported on this platform
    cpu = AttentionBackendEnum.CPU_ATTN.get_path()
    import momentkv.integrations.vllm.cuda  # noqa: F401

    _on_cuda(monkeypatch)
    monkeypatch.setattr(blocks, "register_spec", lambda: None)  # the engine core's registry: not this test's
    monkeypatch.setattr(blocks, "install_spec", lambda budget_of: None)
    try:
        register_backend()
        for name, path in CUDA_BACKENDS.items():
            backend = AttentionBackendEnum[name].get_class()
            assert ".".join(backend.full_cls_name()) == path
            assert issubclass(backend, stock[name]) and backend.get_name() == name
            assert backend.forward_includes_kv_cache_update and not backend.supports_kv_cache_update_bypass
            assert backend.momentkv_evicts
            assert issubclass(backend.get_impl_cls(), stock[name].get_impl_cls())
            assert issubclass(backend.get_builder_cls(), stock[name].get_builder_cls())
            assert backend.get_builder_cls().get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
        assert AttentionBackendEnum.CPU_ATTN.get_path() == cpu  # the CPU's backend: not overridden on CUDA
    finally:
        for name in CUDA_BACKENDS:
            AttentionBackendEnum[name].clear_override()
