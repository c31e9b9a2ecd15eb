"""The CLI: `search --quick` end to end on the embedded model, `eval --json`, and kill-and-resume of the
real `search` subprocess (SIGINT and SIGKILL) on the cheap --synthetic fitness."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

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
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: ")  # the search ends with its verdict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a no-scaling verdict's warning: tested in test_verdict.py
        factors, doc = lr.load_factors(str(out), with_metadata=True)
    assert len(factors) == 30
    assert list(doc["timings_s"]) == ["model load", "baseline (search set)", "sensitivity scan", "GA",
                                      "uniform factors (search set)", "validation (verdict)", "held-out evaluation"]
    assert doc["dtype"] == harness.default_dtype("cpu") and doc["heldout"]["dtype"] == "float32"
    # the verdict: on the validation prompts (seed 5), the GA's distinct finalists, the best uniform, no scaling
    val, verdict, fin, best = doc["validation"], doc["verdict"], doc["finalists"], doc["ga_best"]
    assert val["seed"] == 5 and val["n"] == 9 and val["dtype"] == "float32" and val["test"] == "mcnemar"
    assert list(val["candidates"]) == ["no scaling", f"uniform x{doc['best_uniform']:g}", *fin["names"]]
    assert fin["validation"] == [val["candidates"][n]["fitness"] for n in fin["names"]]
    assert fin["search_dtype"] == sorted(fin["search_dtype"], reverse=True)
    assert verdict["line"] == r.stdout.strip().splitlines()[-1]
    if verdict["scaled"]:
        assert factors == val["candidates"][verdict["chosen"]]["factors"]
        assert val["candidates"][verdict["chosen"]]["beats_baseline"]
    else:
        assert factors == [1.0] * 30 and doc["control_points"] is None
        assert not any(c.get("beats_baseline") for c in val["candidates"].values())
    cfg = lr.GAConfig(**doc["ga"])
    assert best["factors"] == lr.individual_factors(fin["chosen"], cfg) and fin["chosen"] in fin["individuals"]
    assert all(best["factors"][l] == 1.0 for l in doc["frozen"])
    res = doc["heldout"]["results"]
    assert list(res)[0] == "no scaling" and len(res) == 4
    assert all(set(v["accuracy"]) == {"0", "4", "9"} for v in res.values())
    ga_row = [k for k in res if k.startswith("GA")][0]
    assert doc["heldout_factors"][ga_row] == best["factors"]  # the held-out GA row is the GA's pick
    assert (tmp_path / "quick.png").exists()
    race = doc["racing"]
    assert 0 < race["prompts_scored"] <= race["prompts_without_racing"]
    for name, row in res.items():  # every held-out row: intervals per position, paired against no scaling
        assert all(lo <= row["accuracy"][p] <= hi for p, (lo, hi) in row["accuracy_ci95"].items())
        assert (row["vs_baseline"] is None) == (name == "no scaling")
        assert name == "no scaling" or 0 <= row["vs_baseline"]["mcnemar_p"] <= 1
    assert sum(doc["timings_s"].values()) <= doc["wall_s"] + 0.5
    r = cli("eval", "--factors", str(out), "--pairs", "10", "--positions", "3", "--samples", "3", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert verdict["line"] in r.stdout  # beside the held-out rows
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    # eval's last row: the file's factors, or the GA's best when the verdict rejected it
    same = ga_row if not verdict["scaled"] or verdict["chosen"].startswith("GA") else f"uniform x{doc['best_uniform']:g}"
    assert ev["accuracy"] == res[same]["accuracy"]  # same held-out prompts (seed 2), same factors
    assert ev["accuracy_ci95"] == res[same]["accuracy_ci95"] and ev["vs_baseline"] == res[same]["vs_baseline"]
    assert ev["rows"]["no scaling"]["correct"] == res["no scaling"]["correct"]
    assert ev["verdict"] == verdict


MALLINFO = """
import ctypes, sys, torch
import harness
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    raise SystemExit(3)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept" and not harness.keep_freed_memory():
    raise SystemExit(3)
before = libc.mallinfo2()
x = torch.empty(64 << 20, dtype=torch.uint8)  # a batch's activation buffer, above glibc's largest mmap threshold
after = libc.mallinfo2()
print(after.hblkhd - before.hblkhd, after.arena - before.arena)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_serves_large_buffers_from_the_heap():
    """What keep_freed_memory changes, read from glibc's own accounting (mallinfo2), not from the kernel: by
    default a 64 MiB buffer is a fresh mmap (unmapped when freed, so the next batch faults it in again);
    kept, it comes from the heap, which is not trimmed. The page-fault figure this saves depends on the
    machine's page reclaim: benchmarks/bench_malloc.py measures it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grew = {}
    for mode in ("default", "kept"):
        p = subprocess.run([sys.executable, "-c", MALLINFO, mode], env=env, capture_output=True, text=True)
        if p.returncode == 3:
            pytest.skip("not glibc >= 2.33")
        assert p.returncode == 0, p.stderr
        grew[mode] = [int(v) for v in p.stdout.split()[-2:]]  # (mmapped bytes, heap bytes) added
    assert grew["default"][0] >= 64 << 20, grew
    assert grew["kept"][0] == 0 and grew["kept"][1] >= 32 << 20, grew  # (the heap may hold some free space already)
