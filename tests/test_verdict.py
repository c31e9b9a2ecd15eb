"""The verdict (layer_rope section 5): exact McNemar, Holm, the detectable difference, and validated_choice on
planted and pure-noise objectives -- no model, fast. The KV side: three disjoint prompt sets, and
load_factors on a file whose verdict is no scaling."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest

import kv_retrieval as kv
import layer_rope as lr

LAYERS = 4


def paired_outcomes(rng, n, discordant, difference, accuracy=0.4):
    """(candidate, baseline) right/wrong on n prompts: a fraction `discordant` differs, split so that the
    candidate's accuracy is the baseline's + `difference` on average."""
    u, same = rng.random(n), rng.random(n) < accuracy
    only_cand = u < (discordant + difference) / 2
    only_base = (u >= (discordant + difference) / 2) & (u < discordant)
    cand = np.where(only_cand, 1.0, np.where(only_base, 0.0, same * 1.0))
    base = np.where(only_cand, 0.0, np.where(only_base, 1.0, same * 1.0))
    return cand, base


def objective(rng, n, effects, discordant=0.2, accuracy=0.4):
    """Candidates {name: factors} and validate(factors) -> (fitness, right/wrong per prompt): the baseline
    "no scaling" and one candidate per entry of `effects` (its true accuracy difference), all on one prompt
    set: each candidate flips the baseline's outcome on a prompt it gets wrong with probability q0 and on
    one it gets right with q1, so that a fraction `discordant` differs and the mean difference is the effect."""
    base = (rng.random(n) < accuracy).astype(float)
    outcomes, candidates = {(1.0,) * LAYERS: base}, {"no scaling": [1.0] * LAYERS}
    for i, (name, effect) in enumerate(effects.items()):
        q0, q1 = (discordant + effect) / 2 / (1 - accuracy), (discordant - effect) / 2 / accuracy
        flip = rng.random(n) < np.where(base == 0, q0, q1)
        factors = [1.0 + 0.05 * (i + 1)] * LAYERS
        outcomes[tuple(factors)], candidates[name] = np.where(flip, 1 - base, base), factors

    def validate(factors):
        scores = outcomes[tuple(factors)]
        return float(scores.mean()), scores

    return candidates, validate


def test_mcnemar_p_is_the_exact_binomial_test():
    for a, b in [(0, 0), (0, 7), (3, 10), (5, 5), (12, 30), (40, 60), (250, 190), (1, 999)]:
        want = binomtest(a, a + b).pvalue if a + b else 1.0
        assert lr.mcnemar_p(a, b) == pytest.approx(want, rel=1e-9, abs=1e-300), (a, b)
        assert lr.mcnemar_p(a, b) == lr.mcnemar_p(b, a)


def test_holm_matches_the_step_down_definition():
    assert lr.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = list(rng.random(6) ** 3)
        adj = lr.holm(p)
        order = np.argsort(p)
        assert all(a >= q for a, q in zip(adj, p)) and max(adj) <= 1
        assert all(adj[order[i]] <= adj[order[i + 1]] for i in range(5))  # monotone in the p's order
        assert adj[order[0]] == pytest.approx(min(1.0, 6 * p[order[0]]))  # first step: Bonferroni


def test_paired_test_statistics_and_refusals():
    a, b = np.array([1, 1, 1, 0, 1, 0, 1, 1.0]), np.array([0, 1, 0, 0, 1, 0, 0, 1.0])
    s = lr.paired_test(a, b)
    assert s["difference"] == pytest.approx(3 / 8) and (s["only_a"], s["only_b"]) == (3, 0)
    assert s["p"] == pytest.approx(0.25) and s["ci95"][0] <= s["difference"] <= s["ci95"][1]
    boot = lr.paired_test(a + 0.5, b, "bootstrap")
    assert boot["difference"] == pytest.approx(3 / 8 + 0.5) and boot["p"] < 0.01
    assert lr.paired_test(b, b, "bootstrap")["p"] == 1.0
    for bad, message in [((a, b[:3]), "equally long"), ((a * 0.5, b), "right/wrong"),
                         ((a, b * np.nan), "finite"), (([], []), "non-empty")]:
        with pytest.raises(ValueError, match=message):
            lr.paired_test(*bad)
    with pytest.raises(ValueError, match="test must be one of"):
        lr.paired_test(a, b, "t-test")


def test_detectable_difference_has_the_power_it_claims():
    """Simulated power of the exact McNemar test at the claimed difference is ~80% (Connor's formula is a
    normal approximation: within 0.1), and the difference shrinks as 1/sqrt(n)."""
    n, psi = 300, 0.2
    d = lr.detectable_difference(n, discordant=psi)
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        cand, base = paired_outcomes(rng, n, psi, d)
        s = lr.paired_test(cand, base, resamples=10)
        hits += s["p"] <= 0.05 and s["difference"] > 0
    assert 0.7 <= hits / 400 <= 0.9, (d, hits)
    assert lr.detectable_difference(4 * n, discordant=psi) == pytest.approx(d / 2, rel=0.05)
    assert lr.detectable_difference(n, discordant=psi, comparisons=5) > d  # Holm's first step is stricter
    assert math.isinf(lr.detectable_difference(9, discordant=0.1))  # nothing this small a set can detect
    assert lr.detectable_difference(100, sd=1.0) == pytest.approx((1.959964 + 0.841621) / 10, rel=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        lr.detectable_difference(100)


def test_the_guard_picks_a_candidate_that_truly_helps():
    picked = 0
    for seed in range(20):
        candidates, validate = objective(np.random.default_rng(seed), 400,
                                         {"GA #1": 0.0, "GA #2": 0.15, "GA #3": -0.05, "uniform x1.2": 0.0})
        v = lr.validated_choice(validate, candidates, uniform="uniform x1.2")
        picked += v.chosen == "GA #2"
        assert v.chosen in ("GA #2", "no scaling")  # never one that does not help
        if v.chosen == "GA #2":
            assert v.factors == candidates["GA #2"] and v.scaled and v.candidates["GA #2"]["beats_baseline"]
            assert v.shape_vs_uniform["uniform"] == "uniform x1.2"
            assert v.line().startswith("verdict: GA #2 (+0.1")
    assert picked >= 19, picked


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_on_pure_noise_the_guard_says_no_scaling(test):
    """No candidate differs from no scaling: the verdict is no scaling in at least 37 of 40 seeded runs
    (Holm keeps the chance of any false pick per run <= alpha = 0.05)."""
    kept = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        candidates, validate = objective(rng, 250, {f"GA #{i}": 0.0 for i in range(1, 5)} | {"uniform x1.1": 0.0})
        if test == "bootstrap":  # the log-prob objective: any per-prompt value, here noisy log-probs
            base = rng.normal(-2.0, 1.0, 250)
            noisy = {tuple(f): base + rng.normal(0, 0.5, 250) if k != "no scaling" else base
                     for k, f in candidates.items()}
            validate = lambda f, noisy=noisy: (float(noisy[tuple(f)].mean()), noisy[tuple(f)])
        v = lr.validated_choice(validate, candidates, test=test, uniform="uniform x1.1")
        kept += not v.scaled
        if not v.scaled:
            assert v.factors == [1.0] * LAYERS and v.line().startswith("verdict: no scaling -- no candidate beat it")
    assert kept >= 37, kept


def test_verdict_json_and_refusals():
    candidates, validate = objective(np.random.default_rng(0), 100, {"GA #1": 0.0})
    doc = json.loads(json.dumps(lr.validated_choice(validate, candidates).to_json()))
    assert doc["chosen"] == "no scaling" and doc["scaled"] is False and doc["n"] == 100
    assert set(doc["candidates"]) == {"no scaling", "GA #1"} and "p_holm" in doc["candidates"]["GA #1"]
    with pytest.raises(ValueError, match="baseline"):
        lr.validated_choice(validate, {"GA #1": candidates["GA #1"]})
    with pytest.raises(ValueError, match="alpha"):
        lr.validated_choice(validate, candidates, alpha=1.5)
    with pytest.raises(ValueError, match="uniform"):
        lr.validated_choice(validate, candidates, uniform="uniform x9")


def test_load_factors_on_a_no_scaling_verdict_returns_ones_and_says_why(tmp_path):
    path = tmp_path / "f.json"
    line = "verdict: no scaling -- no candidate beat it (best: GA #1, ...)"
    lr.save_factors(path, [1.0] * LAYERS, verdict={"chosen": "no scaling", "scaled": False, "line": line},
                    ga_best={"factors": [1.3] * LAYERS})
    with pytest.warns(UserWarning, match="verdict is no scaling") as caught:
        assert lr.load_factors(path, num_layers=LAYERS) == [1.0] * LAYERS
    assert len(caught) == 1 and line in str(caught[0].message)
    lr.save_factors(path, [1.3] * LAYERS, verdict={"chosen": "GA #1", "scaled": True, "line": "verdict: GA #1"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lr.load_factors(path, num_layers=LAYERS) == [1.3] * LAYERS


def search_args(*argv):
    args = kv._parser()[0].parse_args(["search", *argv])
    return args


def test_search_prompt_sets_are_disjoint_by_construction_and_checked():
    """The README's main job's three sets: seeds 1 / 5 / 2, no example (so no prompt text) shared."""
    args = search_args()
    assert (args.search_seed, args.validation_seed, args.heldout_seed) == (1, 5, 2)
    assert args.validation_samples * args.positions >= 100  # the verdict's n
    search, validation, held = kv.prompt_sets(args)
    texts = [{kv.kv_prompt(ex.records, ex.key) for ex in s} for s in (search, validation, held)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(validation) == args.validation_samples * args.positions
    with pytest.raises(ValueError, match="the search and validation sets share"):
        kv.check_disjoint(search, search[:3] + validation, names=("search", "validation"))
