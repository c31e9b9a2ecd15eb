"""The compact GA: validity, determinism, caching, checkpoint/resume, pool map. No model needed."""

import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import layer_rope as lr

CFG = lr.GAConfig(num_layers=30, population=6, generations=5, seed=3)


class Counting:
    """Fitness that counts calls per individual's factors and can raise after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, factors):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(tuple(factors))
        return lr.synthetic_fitness(factors)


def test_search_improves_and_is_deterministic():
    a = lr.genetic_search(lr.synthetic_fitness, CFG, progress=False)
    b = lr.genetic_search(lr.synthetic_fitness, CFG, progress=False)
    assert a.to_json() == b.to_json()
    assert a.fitness >= a.history[0]["best_fitness"]
    assert a.fitness > lr.synthetic_fitness([1.0] * 30)
    c = lr.genetic_search(lr.synthetic_fitness, lr.GAConfig(**{**CFG.to_json(), "seed": 4}), progress=False)
    assert c.evaluations != a.evaluations
    assert [h["best_fitness"] for h in a.history] == sorted(h["best_fitness"] for h in a.history)  # elitism


def test_never_evaluates_an_individual_twice():
    f = Counting()
    r = lr.genetic_search(f, CFG, progress=False)
    inds = [e[0] for e in r.evaluations]
    assert len(inds) == len(set(inds)) == len(f.calls)
    for i in inds:
        lr.check_individual(i, CFG)


def test_frozen_layers_stay_at_one():
    cfg = lr.GAConfig(num_layers=30, population=4, generations=2, freeze=(16, 3), factor_min=1.5)
    r = lr.genetic_search(lr.synthetic_fitness, cfg, progress=False)
    assert cfg.freeze == (3, 16)
    assert r.factors[16] == r.factors[3] == 1.0 and min(r.factors[:3]) >= 1.5


def test_listed_layers_are_searched_directly_and_the_others_stay_at_one(tmp_path):
    cfg = lr.GAConfig(num_layers=18, layers=(17, 5, 11), factor_max=4.0, factor_step=0.25, population=6,
                      generations=4, seed=1)
    assert cfg.layers == (5, 11, 17) and cfg.genes == 3 and cfg.inner == 0
    assert lr.GAConfig(**cfg.to_json()) == cfg and "layers" not in CFG.to_json()  # old checkpoints still match
    ref = lr.genetic_search(lr.synthetic_fitness, cfg, progress=False)
    for ind, *_ in ref.evaluations:
        f = lr.individual_factors(ind, cfg)
        assert [f[i] for i in (5, 11, 17)] == [cfg.grid[g] for g in ind]
        assert all(v == 1.0 for i, v in enumerate(f) if i not in (5, 11, 17))
    assert [p[0] for p in ref.control_points] == [5 / 17, 11 / 17, 1.0]
    assert ref.fitness > lr.synthetic_fitness([1.0] * 18)
    ck = str(tmp_path / "ck.json")
    with pytest.raises(KeyboardInterrupt):
        lr.genetic_search(Counting(fail_after=9), cfg, checkpoint=ck, progress=False)
    assert lr.genetic_search(lr.synthetic_fitness, cfg, checkpoint=ck, progress=False).to_json() == ref.to_json()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.data())
def test_offspring_of_a_layer_search_are_valid(seed, L, data):
    layers = data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=min(L, 6), unique=True))
    cfg = lr.GAConfig(num_layers=L, layers=tuple(layers), population=4, mutation_rate=0.5)
    rng = np.random.default_rng(seed)
    a, b = lr.random_individual(rng, cfg), lr.random_individual(rng, cfg)
    for ind in (a, b, lr.crossover(a, b, rng, cfg), lr.mutate(a, rng, cfg, force=True)):
        assert len(lr.check_individual(ind, cfg)) == len(layers)
        f = lr.individual_factors(ind, cfg)
        assert len(f) == L and all(v == 1.0 for i, v in enumerate(f) if i not in layers)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.integers(2, 40))
def test_offspring_are_valid(seed, C, L):
    cfg = lr.GAConfig(num_layers=L, num_points=C, population=4, mutation_rate=0.5)
    rng = np.random.default_rng(seed)
    a, b = lr.random_individual(rng, cfg), lr.random_individual(rng, cfg)
    for ind in (a, b, lr.crossover(a, b, rng, cfg), lr.mutate(a, rng, cfg, force=True)):
        lr.check_individual(ind, cfg)
        cp = lr.control_points(ind, cfg)
        assert cp[0][0] == 0.0 and cp[-1][0] == 1.0
        f = lr.individual_factors(ind, cfg)
        assert len(f) == L and all(0.999999 <= v <= 2.000001 for v in f)


def test_factor_grid_includes_both_ends():
    assert CFG.grid[0] == 1.0 and CFG.grid[-1] == 2.0 and len(CFG.grid) == 21


@pytest.mark.parametrize("kw, err", [
    (dict(num_layers=30, factor_min=1.0, factor_max=2.0, factor_step=0.3), ValueError),
    (dict(num_layers=30, factor_min=2.0, factor_max=1.0), ValueError),
    (dict(num_layers=30, factor_min=0.0), ValueError),
    (dict(num_layers=30, num_points=1), ValueError),
    (dict(num_layers=30, freeze=(30,)), ValueError),
    (dict(num_layers=30, freeze=(3, 3)), ValueError),
    (dict(num_layers=30, layers=(30,)), ValueError),
    (dict(num_layers=30, layers=(4, 4)), ValueError),
    (dict(num_layers=30, layers=(4,), freeze=(5,)), ValueError),
    (dict(num_layers=30, layers=(4.0,)), TypeError),
    (dict(num_layers=30, elite=6, population=6), ValueError),
    (dict(num_layers=30, curve="spline"), ValueError),
    (dict(num_layers=30.0), TypeError),
    (dict(num_layers=30, population="8"), TypeError),
    (dict(num_layers=30, factor_max=float("nan")), TypeError),
])
def test_bad_config_is_refused(kw, err):
    with pytest.raises(err):
        lr.GAConfig(**kw)


def test_bad_individuals_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        lr.check_individual((20, 10, 0, 0, 0, 0), CFG)
    with pytest.raises(ValueError, match="factor indices"):
        lr.check_individual((1, 2, 0, 0, 0, 21), CFG)
    with pytest.raises(ValueError, match="genes"):
        lr.check_individual((1, 2, 0), CFG)
    with pytest.raises(TypeError):
        lr.check_individual((1, 2.5, 0, 0, 0, 0), CFG)


def test_nonfinite_fitness_is_refused():
    with pytest.raises(ValueError, match="fitness returned nan"):
        lr.genetic_search(lambda f: float("nan"), CFG, progress=False)


@pytest.mark.parametrize("fail_after", [1, 7, 13, 20])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, fail_after):
    ref = lr.genetic_search(lr.synthetic_fitness, CFG, progress=False)
    ck = str(tmp_path / "ck.json")
    first = Counting(fail_after)
    with pytest.raises(KeyboardInterrupt):
        lr.genetic_search(first, CFG, checkpoint=ck, progress=False)
    saved = json.load(open(ck))
    assert len(saved["evaluations"]) == fail_after  # the cache is saved after every evaluation
    second = Counting()
    res = lr.genetic_search(second, CFG, checkpoint=ck, progress=False)
    assert res.to_json() == ref.to_json()
    assert len(first.calls) + len(second.calls) == len(ref.evaluations)  # nothing evaluated twice
    assert not set(first.calls) & set(second.calls)
    again = Counting()  # resuming a finished search changes nothing and evaluates nothing
    assert lr.genetic_search(again, CFG, checkpoint=ck, progress=False).to_json() == ref.to_json()
    assert again.calls == []


@pytest.mark.parametrize("budget", [1, 6, 9, 100])
def test_evaluation_budget_stops_early_and_resumes_to_the_same_result(tmp_path, budget):
    ref = lr.genetic_search(lr.synthetic_fitness, CFG, progress=False)
    n = min(budget, len(ref.evaluations))
    ck = str(tmp_path / "ck.json")
    first = Counting()
    part = lr.genetic_search(first, CFG, checkpoint=ck, progress=False, max_evaluations=budget)
    assert len(first.calls) == len(part.evaluations) == n
    assert part.stopped_early == (budget < len(ref.evaluations))
    assert part.to_json()["evaluations"] == ref.to_json()["evaluations"][:n]  # the same search, cut short
    assert part.fitness == max(e[1] for e in part.evaluations)
    assert part.factors == lr.individual_factors(part.best, CFG)
    rest = Counting()  # no limit: the search goes on as if it had never stopped
    assert lr.genetic_search(rest, CFG, checkpoint=ck, progress=False).to_json() == ref.to_json()
    assert not set(first.calls) & set(rest.calls)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                        ("10", TypeError)])
def test_bad_evaluation_budget_is_refused(bad, error):
    with pytest.raises(error, match="max_evaluations"):
        lr.genetic_search(lr.synthetic_fitness, CFG, progress=False, max_evaluations=bad)


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "ck.json"
    lr.genetic_search(lr.synthetic_fitness, CFG, checkpoint=str(ck), progress=False, tag={"a": 1})
    text = ck.read_text()
    with pytest.raises(ValueError, match="population"):
        lr.genetic_search(lr.synthetic_fitness, lr.GAConfig(**{**CFG.to_json(), "population": 7}),
                          checkpoint=str(ck), progress=False, tag={"a": 1})
    with pytest.raises(ValueError, match="different fitness"):
        lr.genetic_search(lr.synthetic_fitness, CFG, checkpoint=str(ck), progress=False, tag={"a": 2})
    ck.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        lr.genetic_search(lr.synthetic_fitness, CFG, checkpoint=str(ck), progress=False, tag={"a": 1})
    ck.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a"):
        lr.genetic_search(lr.synthetic_fitness, CFG, checkpoint=str(ck), progress=False, tag={"a": 1})
    doc = json.loads(text)
    doc["population"][0] = [99, 1, 0, 0, 0, 0]
    ck.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="invalid data"):
        lr.genetic_search(lr.synthetic_fitness, CFG, checkpoint=str(ck), progress=False, tag={"a": 1})
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic writes leave no temp files


def test_process_pool_map_gives_the_same_result():
    ref = lr.genetic_search(lr.synthetic_fitness, CFG, progress=False)
    with ProcessPoolExecutor(2) as pool:
        res = lr.genetic_search(lr.synthetic_fitness, CFG, mapper=pool.map, progress=False)
    assert res.to_json() == ref.to_json()
