"""The engine on a CUDA device (skipped without one): the fused kernel path against the masking oracle."""

import pytest
import torch

import momentkv
from momentkv.engine import attention as attention_module
from loops import oracle_run, physical_run
from models import FAMILIES, prompts, tiny_model
from oracle import EngineChoices

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POLICY = {"decode": {"budget": 5, "recent": 2, "sinks": 1,
                     "scorers": [{"type": "ema", "alpha": 0.8, "bias_correction": True}]}}


@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_matches_the_cpu_masking_oracle(family, monkeypatch):
    calls = []
    original = attention_module._fused_step
    monkeypatch.setattr(attention_module, "_fused_step", lambda *a: calls.append(1) or original(*a))
    inputs = prompts(batch=3, length=7)
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    physical, cache = physical_run(tiny_model(family).cuda(), POLICY, cuda_inputs, steps=14)
    oracle = oracle_run(tiny_model(family, "eager"), POLICY, inputs, steps=14)
    assert calls, "the fused kernel was not used"
    assert all(t.device.type == "cuda" for layer in cache.layers for t in [layer.keys, layer.positions, *layer.scoring.states])
    torch.testing.assert_close(physical.cpu(), oracle, rtol=0, atol=2e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generation_on_cuda(dtype):
    model = tiny_model("qwen3", dtype=dtype).cuda()
    inputs = {k: v.cuda() for k, v in prompts(batch=2, length=6).items()}
    with momentkv.patched(model, POLICY) as handle:
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        cache = handle.last_cache
    assert all(torch.isfinite(step).all() for step in out.logits)
    for layer in cache.layers:
        assert layer.stored == 6 + 5
        assert layer.scoring.step_total.dtype == torch.float32 and torch.isfinite(layer.scoring.step_total).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests above cover it")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_wiring_on_cpu_with_the_reference_kernel(family, monkeypatch):
    """The fused step (here through the kernel's torch reference, same contract) matches the oracle."""
    calls = []
    original = attention_module._fused_step
    # The engine asks only on decode steps that score; on CUDA the answer also needs triton and a bool mask.
    monkeypatch.setattr(attention_module, "_fused_applies",
                        lambda query, mask: mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1))
    monkeypatch.setattr(attention_module, "_fused_step", lambda *a: calls.append(1) or original(*a))
    inputs = prompts(batch=3, length=7)
    choices = EngineChoices()  # the oracle checks each eviction and follows the engine through near-ties
    physical, _ = physical_run(tiny_model(family), POLICY, inputs, steps=14, on_step=choices)
    oracle = oracle_run(tiny_model(family, "eager"), POLICY, inputs, steps=14, follow=choices)
    assert calls and choices.checked > 0
    torch.testing.assert_close(physical, oracle, rtol=0, atol=1e-5)
