"""
Fitness throughput: the KV scorer in float32 and bfloat16, and the same GA search run the old way (float32,
every candidate scored on every prompt) and the new way (bfloat16, racing), side by side in one run.

    python benchmarks/bench_fitness.py                          # scorer x3 repeats, then the two searches
    python benchmarks/bench_fitness.py --repeats 1 --generations 2    # a quick look
    python benchmarks/bench_fitness.py --greedy                 # also greedy generate (the old comparison)
    python benchmarks/bench_fitness.py --scorer-only            # part 1 alone

1. Scorer: prompts/s of score_kv on the search set (20 word-key pairs, 5 gold positions), per dtype and
   batch size, interleaved in a fresh random order every repeat; the correct count of each, which must
   agree with float32 for bfloat16 to be a fair stand-in.
2. Search: genetic_search with the CLI's default GA (population 8, 4 generations, layer 16 frozen, seed 0)
   on the same prompts, once as `search --dtype float32 --no-race` evaluates and once as the default does
   (bfloat16 + racing). Reports wall time, prompts scored, candidates per hour and their ratio, and replays
   the new search's finalists in float32 with full scoring: does its float32 pick equal the old search's?
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402


def time_scorer(model, tok, examples, batch_size):
    t = time.perf_counter()
    scores = kv.score_kv(model, tok, examples, batch_size=batch_size)
    return time.perf_counter() - t, sum(s.correct for s in scores)


def run_search(dtype, race, batch_size, examples, args):
    objective = kv.KVObjective(examples, None, "cpu", dtype, batch_size=batch_size)
    config = lr.GAConfig(num_layers=30, freeze=(16,), population=args.population, generations=args.generations,
                         seed=args.seed)
    t = time.perf_counter()
    res = lr.genetic_search(objective, config, progress=False, race=race)
    return res, time.perf_counter() - t, config


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4, help="search prompts per gold position (CLI default 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="the new path's (the old one used 8)")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finalists", type=int, default=4)
    ap.add_argument("--greedy", action="store_true", help="also time greedy generate + the substring metric")
    ap.add_argument("--scorer-only", action="store_true", help="part 1 alone (e.g. on a CPU without native bf16)")
    args = ap.parse_args()

    examples = kv.kv_sets(20, 5, args.samples, seed=1)
    print(harness.run_info("cpu", "float32 and bfloat16"))
    print("native bfloat16 (oneDNN):", torch.ops.mkldnn._is_mkldnn_bf16_supported(), "| torch threads:",
          torch.get_num_threads())
    models = {d: harness.cached_model(None, "cpu", d) for d in ("float32", "bfloat16")}
    variants = [(d, b) for d in models for b in (8, 16)]
    times, correct = {v: [] for v in variants}, {}
    for v in variants:  # warm-up
        time_scorer(*models[v[0]], examples[:2], v[1])
    for _ in range(args.repeats):
        random.shuffle(variants)
        for v in variants:
            seconds, correct[v] = time_scorer(*models[v[0]], examples, v[1])
            times[v].append(seconds)
    base = statistics.median(times[("float32", 8)])
    rows = [[d, b, f"{len(examples) / statistics.median(times[(d, b)]):.2f}",
             f"{base / statistics.median(times[(d, b)]):.2f}", f"{correct[(d, b)]}/{len(examples)}"]
            for d, b in sorted(times)]
    if args.greedy:
        t = time.perf_counter()
        answers = kv.greedy_answers(*models["float32"], examples)
        seconds = time.perf_counter() - t
        hits = sum(kv.kv_correct(a, ex.value) for a, ex in zip(answers, examples))
        rows.append(["float32 greedy generate", 8, f"{len(examples) / seconds:.2f}",
                     f"{base / seconds:.2f}", f"{hits}/{len(examples)}"])
    print(f"\n## Scorer: {len(examples)} prompts (~240 tokens), median of {args.repeats} repeats\n")
    print(harness.markdown_table(["dtype", "batch", "prompts/s", "x float32 batch 8", "correct"], rows))
    if args.scorer_only:
        return

    old, old_s, config = run_search("float32", False, 8, examples, args)
    new, new_s, _ = run_search("bfloat16", True, args.batch_size, examples, args)
    scored = {"old": sum(e[3] for e in old.evaluations), "new": sum(e[3] for e in new.evaluations)}
    per_hour = {"old": 3600 * len(old.evaluations) / old_s, "new": 3600 * len(new.evaluations) / new_s}
    model32, tok = models["float32"]
    full = [e for e in new.evaluations if e[3] == len(examples)]
    finalists = sorted(full, key=lambda e: -e[1])[:args.finalists]
    rescored = {e[0]: kv.kv_fitness(model32, tok, examples, lr.individual_factors(e[0], config)).fitness
                for e in finalists}
    pick = max(rescored, key=rescored.get)
    print(f"\n## The same search (GA population {args.population}, {args.generations} generations, seed "
          f"{args.seed}, layer 16 frozen, {len(examples)} prompts)\n")
    print(harness.markdown_table(
        ["path", "wall s", "evaluations", "prompts scored", "candidates/hour", "x old", "best fitness"],
        [["old: float32, batch 8, full scoring", f"{old_s:.0f}", len(old.evaluations), scored["old"],
          f"{per_hour['old']:.0f}", "1.00", f"{old.fitness:.4f}"],
         [f"new: bfloat16, batch {args.batch_size}, racing", f"{new_s:.0f}", len(new.evaluations), scored["new"], f"{per_hour['new']:.0f}",
          f"{per_hour['new'] / per_hour['old']:.2f}", f"{new.fitness:.4f} (bf16)"]]))
    print(f"\nracing scored {scored['new']} of {len(new.evaluations) * len(examples)} prompts "
          f"({1 - scored['new'] / (len(new.evaluations) * len(examples)):.0%} saved); "
          f"{len(new.evaluations) - len(full)} of {len(new.evaluations)} candidates raced out")
    print(f"new finalists, bf16 fitness {[round(e[1], 4) for e in finalists]} -> float32 "
          f"{[round(v, 4) for v in rescored.values()]}; float32 pick {list(pick)} (fitness {rescored[pick]:.4f}); "
          f"bf16 top-1 = float32 top-1: {pick == finalists[0][0]}; old search best {list(old.best)} "
          f"({old.fitness:.4f}); same curve: {pick == old.best}")


if __name__ == "__main__":
    main()
