"""vLLM tests: run in their own venv (vllm_plugin/install_venv.sh; vLLM pins transformers < 5.20), never by
the main suite. The transformers reference runs in that same venv: layer_rope and harness need only torch and
a transformers 5.x, and the embedded SmolLM2 is loaded and patched exactly as in the main suite."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# no network here: no usage report, no hub look-ups (the engines' subprocesses inherit these)
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_TOKENS = 16
UNIFORM = 2.0


def per_layer(n):
    return [float(f) for f in np.linspace(1.0, 3.5, n)]  # a rising curve over depth, as the searches find


def prompts(tokenizer):
    """Three passkey prompts of about 60, 300 and 700 tokens: long enough that factors change the answer."""
    import harness

    out = []
    for reps in (1, 8, 20):
        text = ("There is a pass key hidden in the text below. Remember it.\n" + (harness.FILLER + " ") * reps
                + "The pass key is 68213. Remember it: 68213 is the pass key.\n" + (harness.FILLER + " ") * reps
                + "What is the pass key? The pass key is")
        out.append(tokenizer(text).input_ids)
    return out


def greedy_transformers(model, prompt_ids, max_tokens=MAX_TOKENS):
    with torch.no_grad():
        out = []
        for ids in prompt_ids:
            ids = torch.tensor([ids])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=model.generation_config.eos_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="session")
def smollm2_case(tmp_path_factory):
    """Folders and transformers' greedy tokens: 'plain' (a folder without factors), 'per_layer' (the artifact
    of lr.save_pretrained), 'uniform' (the plain folder + UNIFORM everywhere, as vLLM's hf_overrides)."""
    import harness
    import layer_rope as lr

    model, tokenizer = harness.load_model()
    n = lr.num_layers(model)
    root = tmp_path_factory.mktemp("smollm2")
    plain, artifact = str(root / "plain"), str(root / "per_layer")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    lr.save_pretrained(model, artifact, per_layer(n), tokenizer=tokenizer)
    ids = prompts(tokenizer)
    ref = {"plain": greedy_transformers(model, ids)}
    with lr.scaled(model, [UNIFORM] * n):
        ref["uniform"] = greedy_transformers(model, ids)
    reloaded, _ = harness.load_model(artifact)
    lr.apply(reloaded)  # the factors from the artifact's config.json
    ref["per_layer"] = greedy_transformers(reloaded, ids)
    return {"num_layers": n, "prompts": ids, "ref": ref, "plain": plain, "artifact": artifact}


def run_llm(model, prompt_ids, hf_overrides=None, max_tokens=MAX_TOKENS):
    """(greedy tokens or None, the completed process) from tests_vllm/run_llm.py in a fresh process."""
    job = json.dumps({"model": model, "prompts": prompt_ids, "max_tokens": max_tokens,
                      "hf_overrides": hf_overrides or {}})
    proc = subprocess.run([sys.executable, os.path.join(HERE, "run_llm.py"), job], capture_output=True, text=True,
                          timeout=600)
    mark = "LAYER_ROPE_TOKENS "  # run_llm.MARK
    lines = [line[len(mark):] for line in proc.stdout.splitlines() if line.startswith(mark)]
    return (json.loads(lines[-1]) if proc.returncode == 0 and lines else None), proc
