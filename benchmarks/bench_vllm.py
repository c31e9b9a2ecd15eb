"""
Generate throughput with per-layer factors: vLLM (CPU build + the layer_rope plugin) over transformers + layer_rope,
on the same prompts, in one run. Runs in the vLLM venv (bash vllm_plugin/install_venv.sh VENV):

    VENV/bin/python benchmarks/bench_vllm.py                         # 16 prompts of 435 tokens, 64 new, float32
    VENV/bin/python benchmarks/bench_vllm.py --prompts 4 --new-tokens 16   # a quick look

The model is the embedded SmolLM2-135M with 30 per-layer factors (1.0 .. 3.5), saved with lr.save_pretrained;
vLLM serves that folder. Every prompt generates exactly --new-tokens tokens (vLLM ignore_eos, transformers
min_new_tokens), greedy. Timed, each once, in this order:
  transformers   model.generate, one prompt at a time (batch 1: what a generate loop does)
  vllm-1         LLM.generate, one prompt per call (the same work as above, in vLLM's engine)
  vllm-all       LLM.generate on all prompts at once (continuous batching, what a server does)
Prints tokens/s for each and the ratios to transformers. The vLLM engine's start (~30-60 s) is not timed.
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import layer_rope as lr  # noqa: E402


def make_prompts(tokenizer, n, reps=16):
    """n passkey prompts of 435 tokens (SmolLM2), each with its own key and depth."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        key, before = int(rng.integers(10000, 99999)), int(rng.integers(1, reps))
        text = ("There is a pass key hidden in the text below. Remember it.\n" + (harness.FILLER + " ") * before
                + f"The pass key is {key}. Remember it: {key} is the pass key.\n"
                + (harness.FILLER + " ") * (reps - before) + "What is the pass key? The pass key is")
        out.append(tokenizer(text).input_ids)
    return out


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="let vLLM compile (default: enforce_eager, as the tests)")
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    model, tokenizer = harness.load_model(dtype=args.dtype)
    factors = [float(f) for f in np.linspace(1.0, 3.5, lr.num_layers(model))]
    prompts = make_prompts(tokenizer, args.prompts)
    n_new = args.prompts * args.new_tokens
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.dtype}, {args.prompts} prompts x {args.new_tokens} new tokens, prompt tokens "
          f"{min(map(len, prompts))}-{max(map(len, prompts))}", flush=True)

    seconds = {}
    lr.apply(model, factors)
    t = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            ids = torch.tensor([ids])
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=model.generation_config.eos_token_id)
    seconds["transformers"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as folder:
        lr.save_pretrained(model, folder, factors, tokenizer=tokenizer)
        del model
        llm = LLM(folder, dtype=args.dtype, max_model_len=2048, kv_cache_memory_bytes=1 << 30,
                  enforce_eager=not args.compile, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        t = time.perf_counter()
        for ids in prompts:
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        seconds["vllm-1"] = time.perf_counter() - t
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        seconds["vllm-all"] = time.perf_counter() - t
        assert sum(len(o.outputs[0].token_ids) for o in outs) == n_new

    print("| engine | seconds | new tokens/s | ratio to transformers |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} | {n_new / s:.1f} | {seconds['transformers'] / s:.2f} |")


if __name__ == "__main__":  # vLLM's CPU platform spawns its engine and workers: they re-import this file
    main()
