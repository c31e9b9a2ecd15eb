# (a) vs (b), run from the repo root on the first, small search (results/first-search-kv.json): python benchmarks/search_space_ab.py
"""(a) vs (b): the GA's random initial population and its best curve, scored with and without the frozen layers."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402
t0 = time.time()
_, doc = lr.load_factors("results/first-search-kv.json", with_metadata=True)
ga = doc["ga"]
cfg_b = lr.GAConfig(**{**ga, "freeze": tuple(ga["freeze"])})
cfg_a = lr.GAConfig(**{**ga, "freeze": ()})
m, tok = harness.load_model()
st = doc["settings"]
search = kv.kv_sets(st["pairs"], st["positions"], st["search_samples"], st["search_seed"])
held = kv.kv_sets(st["pairs"], st["positions"], st["heldout_samples"], st["heldout_seed"])
rows = []
for ind, fb in doc["result"]["evaluations"][: ga["population"]]:
    fa = kv.kv_fitness(m, tok, search, lr.individual_factors(ind, cfg_a))
    rows.append({"individual": ind, "fitness_a": fa.fitness, "acc_a": fa.mean_accuracy, "fitness_b": fb})
    print(rows[-1], flush=True)
best = doc["result"]["best"]
ha = kv.kv_fitness(m, tok, held, lr.individual_factors(best, cfg_a)).to_json()
print("held-out GA best without freezing:", ha["mean_accuracy"], ha["accuracy"], flush=True)
json.dump({"what": "GA initial population (random cubic Beziers, seed %d) scored on the search set in space (a) "
           "(no frozen layers) and (b) (layers %s frozen at 1.0); and the GA-found curve on the held-out set "
           "without its frozen layers" % (ga["seed"], ga["freeze"]), "initial_population": rows,
           "ga_best_unfrozen_heldout": ha, "wall_s": time.time() - t0},
          open("results/first-search-kv-space-a.json", "w"), indent=1)
