"""
Patch overhead: forward time of the patched embedded model over the unpatched one, side by side.

    python benchmarks/bench_patch.py                      # 512, 2k, 8k prefill + 128-token decode + peak RSS
    python benchmarks/bench_patch.py --lengths 512 --repeats 3 --decode-tokens 16   # a quick look

Variants, interleaved in a fresh random order every repeat so drift and other load hit all alike:
  unpatched    the model as loaded
  patched-30   30 distinct factors (1.02 .. 1.60), one per layer: 30 cos/sin pairs per pass
  patched-3    3 distinct factors, 10 layers each
Prefill is one forward over L tokens with logits for the last position only (what generate does).
Decode is 128 greedy steps with a KV cache after a 512-token prompt, time per token; it also reports
the time spent inside the patch's layer pre-hooks per token, an absolute figure that this machine's
run-to-run noise does not blur.
Ratios are per repeat (variant / unpatched of the same repeat), reported as median [min, max].
Peak RSS: each variant's 8k (largest length) forward in its own subprocess, ru_maxrss.
"""

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import layer_rope as lr  # noqa: E402

VARIANTS = {
    "unpatched": None,
    "patched-30": [round(1.02 + 0.02 * i, 2) for i in range(30)],
    "patched-3": [1.2] * 10 + [1.5] * 10 + [1.8] * 10,
}
HOOK = {"spent": 0.0, "decode": None}  # seconds inside the decoder-layer pre-hooks (running; decode steps only)


def prefill_seconds(model, ids):
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1, use_cache=False)
    return time.perf_counter() - t


def decode_seconds_per_token(model, ids, new_tokens):
    with torch.inference_mode():
        out = model(ids, logits_to_keep=1, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        HOOK["spent"] = 0.0
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        HOOK["decode"] = HOOK["spent"] / new_tokens
    return (time.perf_counter() - t) / new_tokens


def run_variant(model, name, fn):
    factors = VARIANTS[name]
    if factors is None:
        return fn()
    inner = lr.scale_layer_positions

    def timed(*a, **k):  # apply() binds the layer pre-hook to the function it finds at apply time
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            HOOK["spent"] += time.perf_counter() - t

    lr.scale_layer_positions = timed
    handle = lr.apply(model, factors)
    lr.scale_layer_positions = inner
    try:
        return fn()
    finally:
        handle.remove()


def summarize(times, base):
    ratios = [t / b for t, b in zip(times, base)]
    return statistics.median(times), statistics.median(ratios), min(ratios), max(ratios)


def one_rss(variant, length):
    """Child process: one prefill forward of `variant` at `length`, print peak RSS in MiB."""
    model, _ = harness.load_model()
    ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    run_variant(model, variant, lambda: prefill_seconds(model, ids))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=5, help="repeats per length (8k and above: min(repeats, 3))")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--one-rss", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_rss:
        return one_rss(args.one_rss[0], int(args.one_rss[1]))

    model, _ = harness.load_model()
    rng = random.Random(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, float32, SDPA, "
          f"SmolLM2-135M-Instruct")
    print("\n| what | variant | median time | ratio to unpatched: median [min, max] | repeats |")
    print("|---|---|---|---|---|")
    jobs = [(f"prefill {L} tok", torch.randint(100, 20000, (1, L), generator=torch.Generator().manual_seed(L)),
             prefill_seconds, min(args.repeats, 3) if L >= 8192 else args.repeats) for L in args.lengths]
    prompt = torch.randint(100, 20000, (1, 512), generator=torch.Generator().manual_seed(1))
    jobs.append((f"decode /token ({args.decode_tokens} new, 512 prompt)", prompt,
                 lambda m, x: decode_seconds_per_token(m, x, args.decode_tokens), args.repeats))
    hooks = {}  # decode: variant -> ms per token inside the layer pre-hooks, one value per repeat
    for what, ids, fn, repeats in jobs:
        decode = what.startswith("decode")
        variants = list(VARIANTS)
        run_variant(model, "patched-30", lambda: fn(model, ids))  # warm-up, not timed
        times = {v: [] for v in variants}
        for _ in range(repeats):
            order = list(variants)
            rng.shuffle(order)
            for v in order:
                HOOK["decode"] = None
                times[v].append(run_variant(model, v, lambda: fn(model, ids)))
                if decode and VARIANTS.get(v, True) is not None:
                    hooks.setdefault(v, []).append(HOOK["decode"] * 1e3)
        for v in variants:
            med, r, lo, hi = summarize(times[v], times["unpatched"])
            unit = f"{med * 1e3:.1f} ms"
            print(f"| {what} | {v} | {unit} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {repeats} |", flush=True)
    if hooks:
        print("\n| decode: time inside the layer pre-hooks | ms per token: median [min, max] |\n|---|---|")
        for v, ms in hooks.items():
            print(f"| {v} | {statistics.median(ms):.3f} [{min(ms):.3f}, {max(ms):.3f}] |")

    if not args.no_rss:
        L = max(args.lengths)
        print(f"\n| peak RSS, one prefill of {L} tokens (own process) | MiB |\n|---|---|")
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one-rss", v, str(L)], capture_output=True, text=True,
                                 check=True).stdout.split()[-1]
            print(f"| {v} | {float(out):.0f} |", flush=True)


if __name__ == "__main__":
    main()
