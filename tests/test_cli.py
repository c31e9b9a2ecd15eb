"""The CLI: `search --quick` end to end on the embedded model, `eval --json`, and kill-and-resume of the
real `search` subprocess (SIGINT and SIGKILL) on the cheap --synthetic fitness."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import harness
import layer_rope as lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = ["--synthetic", "--population", "6", "--generations", "5", "--seed", "7", "--no-progress"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "kv_retrieval.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, **kw)


def _evals(ck):
    try:
        with open(ck) as f:
            return len(json.load(f)["evaluations"])
    except (OSError, ValueError):
        return -1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = cli("search", *SYN, "--out", str(d / "ref.json"))
    assert r.returncode == 0, r.stderr
    _, doc = lr.load_factors(str(d / "ref.json"), with_metadata=True)
    return doc["result"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_search_resumes_to_the_same_result(tmp_path, reference, sig):
    out, ck, log = tmp_path / "s.json", tmp_path / "s.ckpt.json", tmp_path / "evals.log"
    args = ["search", *SYN, "--out", str(out), "--eval-delay", "0.3", "--eval-log", str(log)]
    # Ctrl-C as a user at a terminal sends it: default SIGINT disposition in the child, even when this test
    # runs in a background job (shells start those with SIGINT ignored, and Python keeps it ignored).
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "kv_retrieval.py"), *args], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while _evals(ck) < 8 and time.time() < deadline:  # mid-generation 2 (population 6)
        time.sleep(0.01)
    n = _evals(ck)
    while _evals(ck) == n and time.time() < deadline:  # kill right after a checkpoint write
        time.sleep(0.005)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert not out.exists(), "the search finished before it was killed"
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "resume" in err, err
    json.load(open(ck))  # intact
    done_before = _evals(ck)
    assert 8 <= done_before < len(reference["evaluations"])
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    _, doc = lr.load_factors(str(out), with_metadata=True)
    assert doc["result"] == reference
    logged = open(log).read().splitlines()
    assert len(logged) == len(set(logged)) == len(reference["evaluations"])  # no individual evaluated twice


def test_search_stopped_at_an_evaluation_budget_goes_on_to_the_same_result(tmp_path, reference):
    out = tmp_path / "s.json"
    r = cli("search", *SYN, "--out", str(out), "--max-evaluations", "9")
    assert r.returncode == 0 and "stopped at --max-evaluations 9" in r.stdout, r.stderr
    _, doc = lr.load_factors(str(out), with_metadata=True)
    assert doc["result"]["stopped_early"] and len(doc["result"]["evaluations"]) == 9
    assert doc["result"]["evaluations"] == reference["evaluations"][:9]
    r = cli("search", *SYN, "--out", str(out))  # the same command without the budget finishes the search
    assert r.returncode == 0, r.stderr
    assert lr.load_factors(str(out), with_metadata=True)[1]["result"] == reference
    r = cli("search", *SYN, "--out", str(tmp_path / "x.json"), "--max-evaluations", "0")
    assert r.returncode != 0 and "--max-evaluations must be at least 1" in r.stderr


def test_bad_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "bad.ckpt.json"
    ck.write_text('{"format": "layer_rope.ga-checkpoint/1", "config": {')
    r = cli("search", *SYN, "--out", str(tmp_path / "bad.json"))
    assert r.returncode != 0 and "corrupt or truncated" in r.stderr
    r = cli("search", *SYN, "--out", str(tmp_path / "x.json"), "--freeze", "1,a")
    assert r.returncode != 0 and "--freeze" in r.stderr


def test_search_layers_searches_those_layers_only(tmp_path):
    out = tmp_path / "s.json"
    r = cli("search", *SYN, "--layers", "12", "--search-layers", "7,2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    factors, doc = lr.load_factors(str(out), with_metadata=True)
    assert doc["ga"]["layers"] == [2, 7] and len(doc["result"]["best"]) == 2
    assert all(f == 1.0 for i, f in enumerate(factors) if i not in (2, 7)) and factors != [1.0] * 12
    for bad, message in [("2,x", "--search-layers takes comma-separated layer indices"),
                         ("12", "not a layer index in 0 .. 11")]:
        r = cli("search", *SYN, "--layers", "12", "--search-layers", bad, "--out", str(tmp_path / "x.json"))
        assert r.returncode != 0 and message in r.stderr, r.stderr


def test_quick_search_and_eval_end_to_end(tmp_path):
    out = tmp_path / "quick.json"
    r = cli("search", "--quick", "--out", str(out), "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    factors, doc = lr.load_factors(str(out), with_metadata=True)
    assert len(factors) == 30 and len(doc["control_points"]) == 4
    assert all(factors[l] == 1.0 for l in doc["frozen"])
    res = doc["heldout"]["results"]
    assert list(res)[0] == "no scaling" and len(res) == 4
    assert all(set(v["accuracy"]) == {"0", "4", "9"} for v in res.values())
    assert (tmp_path / "quick.png").exists()
    assert list(doc["timings_s"]) == ["model load", "baseline (search set)", "sensitivity scan", "GA",
                                      "finalists re-scored", "uniform factors (search set)", "held-out evaluation"]
    assert doc["dtype"] == harness.default_dtype("cpu") and doc["heldout"]["dtype"] == "float32"
    fin = doc["finalists"]
    assert len(fin["float32"]) == len(fin["individuals"]) >= 1 and fin["chosen"] in fin["individuals"]
    # a float32 search (a CPU without native bfloat16) is not scored again in float32: its scores are kept
    assert fin["rescored"] == (doc["dtype"] != "float32")
    assert fin["rescored"] or fin["float32"] == fin["search_dtype"]
    assert factors == lr.individual_factors(fin["chosen"], lr.GAConfig(**doc["ga"]))
    race = doc["racing"]
    assert 0 < race["prompts_scored"] <= race["prompts_without_racing"]
    for name, row in res.items():  # every held-out row: intervals per position, paired against no scaling
        assert all(lo <= row["accuracy"][p] <= hi for p, (lo, hi) in row["accuracy_ci95"].items())
        assert (row["vs_baseline"] is None) == (name == "no scaling")
        assert name == "no scaling" or 0 <= row["vs_baseline"]["mcnemar_p"] <= 1
    assert sum(doc["timings_s"].values()) <= doc["wall_s"] + 0.5
    r = cli("eval", "--factors", str(out), "--pairs", "10", "--positions", "3", "--samples", "3", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    ga = [v for k, v in res.items() if k.startswith("GA")][0]
    assert ev["accuracy"] == ga["accuracy"]  # same held-out prompts (seed 2), same factors
    assert ev["accuracy_ci95"] == ga["accuracy_ci95"] and ev["vs_baseline"] == ga["vs_baseline"]
    assert ev["rows"]["no scaling"]["correct"] == res["no scaling"]["correct"]


FAULTS = """
import resource, sys, torch
import harness
if sys.argv[1] == "kept" and not harness.keep_freed_memory():
    raise SystemExit(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a batch's activation buffer, freed and allocated again
    torch.empty(32 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_faulting_freed_buffers_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {}
    for mode in ("default", "kept"):
        p = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True)
        if p.returncode == 3:
            pytest.skip("not glibc")
        assert p.returncode == 0, p.stderr
        faults[mode] = int(p.stdout.split()[-1])
    # default: every 32 MiB buffer is mmap'd, faulted in page by page and unmapped (20 x 8192 pages);
    # kept: the first one's pages are reused
    assert faults["default"] > 20 * 4096, faults
    assert faults["kept"] < faults["default"] / 5, faults
