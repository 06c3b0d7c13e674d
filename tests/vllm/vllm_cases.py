"""What the vLLM tests generate, shared by ``conftest.py`` (which runs the engines) and the tests."""

NEW_TOKENS = 40  # greedy tokens per prompt
TOP = 3  # log-probabilities vLLM returns per step
BLOCK = 32  # tokens per KV block where the block cap is tested (the CPU backend takes multiples of 32)
PREEMPTING_BLOCKS = 8  # the null block and 7 of 32 tokens: the three requests need 9 at the end
