"""
Replay a recorded search without racing: did racing change what the GA chose?

    python benchmarks/racing_replay.py results/lim-long/search-ga-middle-seed0.json

The GA is deterministic given the fitness of every candidate, so the search is run again with race=False
and a fitness that returns the recorded value for every candidate racing scored in full, and scores in
full (same model, dtype, prompts and batch size) the candidates racing stopped early, and any candidate
the replayed trajectory reaches that the recorded one did not. Reports the candidates racing stopped, the
prompts it saved, their full fitness against the bar they missed, and whether the replayed search ends
with the same best individual and the same evaluations.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("search", help="a factors JSON written by `layer_rope.py search`")
    args = ap.parse_args()
    _, doc = lr.load_factors(args.search, with_metadata=True)
    st, config = doc["settings"], lr.GAConfig(**doc["ga"])
    examples = kv.kv_sets(st["pairs"], st["positions"], st["search_samples"], st["search_seed"], st["data"], 0,
                          st["filler"])
    recorded = {tuple(e[0]): e for e in doc["result"]["evaluations"]}
    model, tok = harness.cached_model(st["model"], st["device"], st["dtype"])
    kw = dict(weights=st["weights"], chat=st["chat"], batch_size=st["batch_size"], objective=st["objective"])
    by_factors = {tuple(lr.individual_factors(ind, config)): ind for ind in recorded}
    full, started = {}, time.time()

    def fitness(factors):
        ind = by_factors.get(tuple(factors))
        if ind is not None and recorded[ind][3] in (None, len(examples)):
            return recorded[ind][1]
        full[tuple(factors)] = kv.kv_fitness(model, tok, examples, factors, **kw).fitness
        return full[tuple(factors)]

    replay = lr.genetic_search(fitness, config, progress=False)
    raced = [e for e in doc["result"]["evaluations"] if e[3] not in (None, len(examples))]
    print(f"{args.search}: {len(recorded)} candidates, {len(raced)} stopped early by racing; prompts scored "
          f"{sum(e[3] for e in recorded.values())} of {len(recorded) * len(examples)} "
          f"({1 - sum(e[3] for e in recorded.values()) / (len(recorded) * len(examples)):.1%} saved)")
    for e in raced:
        f = tuple(lr.individual_factors(tuple(e[0]), config))
        print(f"  generation {e[2]}: {e[0]} stopped after {e[3]} prompts with bound {e[1]:.4f}; "
              f"full fitness {full.get(f, float('nan')):.4f}")
    same = [list(e[0]) for e in replay.evaluations] == [e[0] for e in doc["result"]["evaluations"]]
    print(f"replay without racing: best {list(replay.best)} ({replay.fitness:.4f}); recorded best "
          f"{doc['result']['best']} ({doc['result']['fitness']:.4f}); same best: {list(replay.best) == doc['result']['best']}; "
          f"same candidates in the same order: {same}; {len(full)} candidates scored in full now, "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
