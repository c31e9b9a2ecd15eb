"""Greedy tokens from vLLM's offline `LLM` in a process of its own (a fresh engine per call, so a refused
model cannot leave a half-started engine behind in the test process).

    python tests_vllm/run_llm.py '{"model": DIR, "prompts": [[ids...], ...], "max_tokens": 16, "hf_overrides": {}}'

prints the generated token ids as one JSON line after MARK on stdout (vLLM logs to stdout too).
"""

import json
import sys

MARK = "LAYER_ROPE_TOKENS "

# the settings the tests and the benchmark share: float32 as the transformers reference, a KV cache of 1 GiB
# (the CPU backend otherwise reserves 92 % of the machine's memory), eager mode (no torch.compile warm-up)
LLM_ARGS = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=1 << 30, enforce_eager=True, seed=0)


def main():
    from vllm import LLM, SamplingParams

    job = json.loads(sys.argv[1])
    llm = LLM(job["model"], hf_overrides=job.get("hf_overrides") or {}, **LLM_ARGS)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]],
                        SamplingParams(temperature=0.0, max_tokens=job["max_tokens"]),
                        use_tqdm=False)
    print(MARK + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":  # the CPU platform spawns its engine and workers: they re-import this file
    main()
