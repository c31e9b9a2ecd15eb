"""
Fitness throughput: teacher-forced KV scoring against greedy `generate`, on the same examples, side by side.

    python benchmarks/bench_fitness.py                  # 40 examples (20 word-key pairs, 5 gold positions), 3 repeats
    python benchmarks/bench_fitness.py --examples 10 --repeats 1    # a quick look

Variants (interleaved in a fresh random order every repeat):
  tf-batched     score_kv, batch 8: one forward per example, logits only at the gold-answer positions
  tf-unbatched   score_kv, batch 1
  tf-full-head   the same forward but the lm_head over every position (what a plain model(ids) costs)
  greedy         greedy_answers (model.generate, KV cache, batch 8, 8 new tokens) + the substring metric
Reports examples/s (median over repeats) and the ratio to greedy, the agreement of the teacher-forced
exact match with greedy+substring, and where the time of one teacher-forced forward goes.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import layer_rope as lr  # noqa: E402


@torch.inference_mode()
def tf_full_head(model, tok, examples):
    """Teacher forcing as a naive implementation does it: full logits for every position."""
    for ex in examples:
        p = lr._encode(tok, lr._prompt_text(tok, ex, False))
        g = lr._encode(tok, lr.ANSWER_PREFIX + ex.value)
        model(torch.tensor([p + g[:-1]]), use_cache=False).logits.argmax(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = lr.load_model()
    pos = lr.gold_positions(20, 5)
    per = max(1, args.examples // len(pos))
    examples = [ex for p in pos for ex in lr.make_kv_examples(per, num_pairs=20, gold_index=p, seed=7)]
    n = len(examples)
    ntok = statistics.mean(len(lr._encode(tok, lr._prompt_text(tok, ex, False))) for ex in examples)

    variants = {
        "tf-batched": lambda: lr.score_kv(model, tok, examples, batch_size=8),
        "tf-unbatched": lambda: lr.score_kv(model, tok, examples, batch_size=1),
        "tf-full-head": lambda: tf_full_head(model, tok, examples),
        "greedy": lambda: lr.greedy_answers(model, tok, examples, max_new_tokens=8, batch_size=8),
    }
    times = {v: [] for v in variants}
    results = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            t = time.perf_counter()
            results[v] = variants[v]()
            times[v].append(time.perf_counter() - t)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, SDPA, SmolLM2-135M-Instruct; "
          f"{n} examples, {ntok:.0f} prompt tokens on average, {args.repeats} repeats\n")
    print("| variant | examples/s (median) | s/example | speed-up over greedy: median [min, max] |")
    print("|---|---|---|---|")
    for v in variants:
        ratios = [g / t for t, g in zip(times[v], times["greedy"])]
        med = statistics.median(times[v])
        print(f"| {v} | {n / med:.2f} | {med / n:.3f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] |")

    tf = [s.correct for s in results["tf-batched"]]
    gr = [lr.kv_correct(a, ex.value) for a, ex in zip(results["greedy"], examples)]
    agree = sum(a == b for a, b in zip(tf, gr))
    print(f"\nagreement, teacher-forced exact match vs greedy + substring metric: {agree}/{n} "
          f"({100 * agree / n:.1f}%); accuracy tf {sum(tf) / n:.3f}, greedy {sum(gr) / n:.3f}")

    # where the time of one teacher-forced forward goes (batch 8, the first batch)
    ids = torch.tensor([lr._encode(tok, lr._prompt_text(tok, ex, False)) for ex in examples[:1]] * 8)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        model.lm_head(hidden)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\nwhere a forward of 8 x {ids.shape[1]} tokens with full logits spends its time (torch.profiler, self CPU):")
    print("| op | share |\n|---|---|")
    for e in rows:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% |")
    head_flops = 2 * model.config.hidden_size * model.config.vocab_size
    cfg = model.config
    layer_flops = cfg.num_hidden_layers * 2 * (cfg.hidden_size * (cfg.hidden_size + 2 * cfg.num_key_value_heads *
                                                                    cfg.hidden_size // cfg.num_attention_heads
                                                                    + cfg.hidden_size) +
                                               3 * cfg.hidden_size * cfg.intermediate_size)
    print(f"\nlm_head share of per-token matmul FLOPs with full logits: "
          f"{100 * head_flops / (head_flops + layer_flops):.1f}%")


if __name__ == "__main__":
    main()
