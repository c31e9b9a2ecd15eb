"""experiments/length_scan.py: cells, the dip test, and a killed scan resuming where it stopped."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import length_scan  # noqa: E402
import kv_retrieval as kv  # noqa: E402


def test_parse_cell_reads_both_formats_and_names_a_bad_cell():
    assert length_scan.parse_cell("long:20:6") == {"name": "long:20:6", "pairs": 20, "filler": 6}
    assert length_scan.parse_cell("json:140") == {"name": "json:140", "pairs": 140, "filler": 0}
    for bad in ("long:20", "long:20:0", "json:0", "json:x", "jsn:20", f"json:{len(kv.KV_WORDS) + 1}", "long:20:6:1"):
        with pytest.raises(ValueError, match="cell"):
            length_scan.parse_cell(bad)


def test_cells_put_the_same_records_at_every_position():
    ex = length_scan.cell_examples(length_scan.parse_cell("long:10:1"), positions=3, samples=2)
    assert [e.gold_index for e in ex] == [0, 0, 4, 4, 9, 9] and all(e.filler == 1 for e in ex)
    assert frozenset(ex[0].records) == frozenset(ex[2].records) == frozenset(ex[4].records)


def test_dip_test_matches_the_recorded_filler_curve():
    # results/filler-curve.md, filler 1: 15/24 in the middle vs 16/16 at the ends, p = 0.006
    correct_at = {0: [True] * 8, 5: [True] * 5 + [False] * 3, 10: [True] * 5 + [False] * 3,
                  14: [True] * 5 + [False] * 3, 19: [True] * 8}
    d = length_scan.dip_test(correct_at)
    assert d["middle"] == [15, 24] and d["ends"] == [16, 16]
    assert d["p"] == pytest.approx(0.00595, abs=1e-4)
    flat = length_scan.dip_test({0: [True, False], 5: [True, False], 9: [True, False]})
    assert flat["p"] == pytest.approx(1.0)


def test_a_killed_scan_resumes_where_it_stopped(tmp_path, monkeypatch, smollm2):
    out = str(tmp_path / "new" / "scan.json")  # a folder not there yet is made
    argv = ["--cells", "json:6,long:4:1", "--positions", "2", "--samples", "2", "--out", out]
    real, calls = kv.score_kv, []

    def dies_on_the_sixth(model, tok, examples, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append([e.gold_index for e in examples])
        return real(model, tok, examples, **kw)

    monkeypatch.setattr(kv, "score_kv", dies_on_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        length_scan.main(argv)
    doc = json.load(open(out))
    assert doc["cells"]["json:6"]["done"] and len(doc["cells"]["json:6"]["scores"]) == 4
    assert len(doc["cells"]["long:4:1"]["scores"]) == 1 and not doc["cells"]["long:4:1"].get("done")
    first = dict(doc["cells"]["json:6"]["scores"])

    calls.clear()
    monkeypatch.setattr(kv, "score_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    length_scan.main(argv)
    doc = json.load(open(out))
    assert len(calls) == 3  # long:4:1's 3 prompts not yet scored, one per batch; json:6 was not scored again
    assert doc["cells"]["json:6"]["scores"] == first and doc["cells"]["long:4:1"]["done"]
    s = doc["cells"]["long:4:1"]["summary"]
    assert list(s["positions"]) == ["0", "3"] and s["prompts"] == 4 and s["tokens"]["mean"] > 50
    table = open(str(tmp_path / "new" / "scan.md")).read()
    assert "| json:6 |" in table and "| long:4:1 |" in table and "Fisher" in table
    assert "| 0/5 |" in table and "| 0/3 |" in table  # each cell's own gold indices
    assert os.path.exists(str(tmp_path / "new" / "scan.png"))

    with pytest.raises(SystemExit, match="other settings"):
        length_scan.main([*argv[:-2], "--samples", "3", "--out", out])
