"""
Search quality at equal budget: layer_rope's GA against random search, pygad and nevergrad (NGOpt, CMA).

    python benchmarks/bench_optimisers.py                    # synthetic objective, 10 seeds, 50/100/200 evals
    python benchmarks/bench_optimisers.py --real --budgets 12 24 --seeds 2 --positions 3 --per-position 3
                                                             # the real KV fitness, small budget (~23 min CPU)

All optimisers search the same space: the GA's individuals (GAConfig defaults for a 30-layer model:
4 control points, inner layer positions 0..29, factors 1.0..2.0 in steps of 0.05), as integer genes
with the same bounds. Every optimiser gets an evaluation cache, so a repeated point is free and the
budget counts distinct evaluations for all of them alike.

Synthetic objective (known optimum): -mean((f - f*)^2) over the 30 layer factors, f* the factors of one
fixed individual, so the optimum 0 is reachable. Real objective: `kv_fitness` of the embedded model on
a small search set (accuracy + the gold-probability tie-breaker), with layer 16 held at 1.0 (--freeze) as
the default `search` does after its sensitivity scan picks it: without it nearly every curve scores 0.
Reported: best objective after each budget, mean and [min, max] over seeds.
"""

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402

CONFIG = lr.GAConfig(num_layers=30)  # replaced in main() when --freeze is given
TARGET = (8, 20, 0, 14, 4, 0)  # inner layer positions 8 and 20; factors 1.0, 1.7, 1.2, 1.0


class Stop(Exception):
    pass


class Budgeted:
    """The objective behind a cache keyed by the factors, with a trace of the best value after each
    distinct evaluation. Raises Stop when asked for a new point once the budget is spent."""

    def __init__(self, objective, budget):
        self.objective, self.budget, self.cache, self.trace = objective, budget, {}, []

    def factors(self, factors):
        key = tuple(factors)
        if key not in self.cache:
            if len(self.cache) >= self.budget:
                raise Stop
            self.cache[key] = self.objective(list(factors))
            self.trace.append(max(self.cache[key], self.trace[-1] if self.trace else -np.inf))
        return self.cache[key]

    def __call__(self, genes):
        """Integer genes as the other optimisers see them -> the GA's individual -> its factors."""
        C = CONFIG.num_points
        g = [int(round(v)) for v in genes]
        return self.factors(lr.individual_factors(tuple(sorted(g[:C - 2]) + g[C - 2:]), CONFIG))


def bounds():
    C, L, M = CONFIG.num_points, CONFIG.num_layers, len(CONFIG.grid)
    return [L - 1] * (C - 2) + [M - 1] * C


def run_ga(f, seed):
    cfg = lr.GAConfig(num_layers=30, freeze=CONFIG.freeze, seed=seed, generations=10_000)
    lr.genetic_search(f.factors, cfg, progress=False)


def run_random(f, seed):
    rng = np.random.default_rng(seed)
    for _ in range(100 * f.budget):
        f(lr.random_individual(rng, CONFIG))


def run_pygad(f, seed):
    import logging

    import pygad

    quiet = logging.getLogger("bench_optimisers.pygad")  # pygad logs the Stop that ends the budget as an error
    quiet.setLevel(logging.CRITICAL + 1)
    hi = bounds()

    def fitness_func(ga, solution, idx):
        return f(solution)

    ga = pygad.GA(num_generations=10_000, num_parents_mating=4, sol_per_pop=8, num_genes=len(hi),
                  gene_space=[range(h + 1) for h in hi], gene_type=int, fitness_func=fitness_func,
                  random_seed=seed, suppress_warnings=True,
                  mutation_percent_genes=30, keep_elitism=2, logger=quiet)
    ga.run()


def run_nevergrad(f, seed, name):
    import nevergrad as ng

    hi = np.array(bounds(), dtype=float)
    param = ng.p.Array(shape=(len(hi),), lower=np.zeros_like(hi), upper=hi).set_integer_casting()
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[name](parametrization=param, budget=f.budget * 20)
    for _ in range(f.budget * 20):
        x = opt.ask()
        opt.tell(x, -f(x.value))


OPTIMISERS = {
    "layer_rope GA": run_ga,
    "random search": run_random,
    "pygad": run_pygad,
    "nevergrad NGOpt": lambda f, s: run_nevergrad(f, s, "NGOpt"),
    "nevergrad CMA": lambda f, s: run_nevergrad(f, s, "CMA"),
}


def synthetic_objective():
    target = np.array(lr.individual_factors(TARGET, CONFIG))
    return lambda factors: -float(np.mean((np.asarray(factors) - target) ** 2))


def real_objective(n_per_position, positions):
    model, tok = harness.load_model()
    pos = kv.gold_positions(20, positions)
    examples = [ex for p in pos for ex in kv.make_kv_examples(n_per_position, num_pairs=20, gold_index=p, seed=1)]
    return lambda factors: kv.kv_fitness(model, tok, examples, factors).fitness


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="the KV fitness of the embedded model instead")
    p.add_argument("--budgets", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--optimisers", nargs="+", default=list(OPTIMISERS), choices=list(OPTIMISERS))
    p.add_argument("--per-position", type=int, default=4, help="--real: examples per gold position")
    p.add_argument("--positions", type=int, default=5, help="--real: gold positions")
    p.add_argument("--freeze", type=int, nargs="*", default=None,
                   help="layers held at 1.0 for every optimiser (default: 16 with --real, none otherwise)")
    args = p.parse_args()
    global CONFIG
    freeze = tuple(args.freeze if args.freeze is not None else ([16] if args.real else []))
    CONFIG = lr.GAConfig(num_layers=30, freeze=freeze)
    budgets = args.budgets or ([24] if args.real else [50, 100, 200])
    seeds = args.seeds or (2 if args.real else 10)
    objective = real_objective(args.per_position, args.positions) if args.real else synthetic_objective()
    warnings.filterwarnings("ignore")
    what = (f"real KV fitness ({args.positions} gold positions x {args.per_position} examples, 20 word-key pairs)"
            if args.real else "synthetic objective (optimum 0)") + (f", layers {list(freeze)} frozen" if freeze else "")
    print(f"{what}; best value after n distinct evaluations, mean [min, max] over {seeds} seeds\n")
    print("| optimiser | " + " | ".join(f"n = {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in args.optimisers:
        best = {b: [] for b in budgets}
        for seed in range(seeds):
            f = Budgeted(objective, max(budgets))
            try:
                OPTIMISERS[name](f, seed)
            except Stop:
                pass
            for b in budgets:
                best[b].append(f.trace[min(b, len(f.trace)) - 1])
        cells = [f"{np.mean(v):.4f} [{min(v):.4f}, {max(v):.4f}]" for v in best.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
