"""Attention sorting and positional-bias calibration (baselines.py, section 3) on tiny random-weight models with the
embedded SmolLM2's tokenizer: the per-record attention against eager attention's own weights (float64, left-padded
batches, GQA, per-head norms, sliding windows, soft-capping, SDPA), a planted attention pattern recovered by the
sort and the calibration, the attention intervention's redistribution, and refusals."""

import numpy as np
import pytest
import torch

import baselines as bl
import kv_retrieval as kv
from tiny_models import single_thread, tiny  # noqa: F401

VOCAB = 49152  # SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def examples(n=3, pairs=5, seed=0, **kw):
    """Prompts of a few lengths (query-aware ones are longer), so a batch of them is left-padded."""
    return [ex for qa in (False, True) for ex in kv.make_kv_examples(n, pairs, 2, seed=seed, query_aware=qa, **kw)]


def eager_record_attention(model, tok, exs):
    """The oracle: each prompt alone through the eager model, output_attentions' last row summed per record."""
    out = []
    for ex in exs:
        ids = torch.tensor([kv.prompt_ids(tok, ex)])
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions  # per layer (1, H, T, T)
        spans = bl.record_token_spans(tok, ex)
        out.append([[[float(a[0, h, -1, s:e].sum()) for s, e in spans] for h in range(a.shape[1])] for a in att])
    return np.array(out)


def test_record_spans_cover_each_record(tok):
    for ex in examples(1) + examples(1, filler=1):
        ids = kv.prompt_ids(tok, ex)
        spans = bl.record_token_spans(tok, ex)
        assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:])) and spans[-1][1] <= len(ids)
        for (k, v), (s, e) in zip(ex.records, spans):
            text = tok.decode(ids[s:e])
            assert k in text and v in text and text.count(":") <= 2 + ex.filler * 10


@pytest.mark.parametrize("family,kw", [("llama", {}), ("gemma3_text", dict(sliding_window=48)),
                                       ("gemma2", dict(sliding_window=48)), ("qwen3", {})])
def test_record_attention_equals_eager_weights(tok, family, kw):
    """Hooks only, against each prompt alone through eager attention (float64): one prompt at a time, and left-padded
    batches -- in SDPA, since transformers' eager float64 turns padded batches into NaN (fully masked padding rows),
    and in eager float32. Gemma 3 / Gemma 2 prompts (83-90 tokens) exceed the sliding window, Gemma 2 soft-caps
    logits (eager only), Qwen3 and Gemma 3 have per-head q_norm/k_norm; GQA everywhere (4 query, 2 KV heads)."""
    exs = examples()
    eager = tiny(family, "eager", dtype=torch.float64, vocab_size=VOCAB, **kw)
    assert len({len(kv.prompt_ids(tok, ex)) for ex in exs}) > 1
    want = eager_record_attention(eager, tok, exs)
    assert want.shape == (len(exs), 3, 4, 5) and want.max() > 0.05
    # eager's softmax runs in float32 whatever the model's dtype: agreement to float32 rounding
    np.testing.assert_allclose(bl.record_attention(eager, tok, exs, batch_size=1), want, rtol=0, atol=1e-6)
    eager32 = tiny(family, "eager", dtype=torch.float32, vocab_size=VOCAB, **kw)
    np.testing.assert_allclose(bl.record_attention(eager32, tok, exs, batch_size=4),
                               eager_record_attention(eager32, tok, exs), rtol=0, atol=2e-6)
    if family != "gemma2":  # SDPA does not soft-cap
        sdpa = tiny(family, "sdpa", dtype=torch.float64, vocab_size=VOCAB, **kw)
        got = bl.record_attention(sdpa, tok, exs, batch_size=4)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, bl.record_attention(sdpa, tok, exs, batch_size=1), rtol=0, atol=1e-12)


# -- a planted pattern: the last token's query matches one key word's key -------------------------------

PLANT = "dose"


def planted_model(tok, plant=3.0, recency=0.0):
    """One llama layer whose only query (from the prompt's last token ':') matches the key of the token PLANT, in the
    RoPE dims that do not rotate at these lengths (theta 1e12: frequency 1e-9): the record holding PLANT gets more
    attention wherever it is. recency > 0 adds a positional bias: every token's key and that query share a
    component in the dims of frequency 1e-3, whose logit recency * cos(1e-3 * distance) falls with distance."""
    m = tiny("llama", "eager", dtype=torch.float64, vocab_size=VOCAB, num_hidden_layers=1,
             rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    ids, colon = tok.convert_tokens_to_ids(PLANT), tok.convert_tokens_to_ids(":")
    att = m.model.layers[0].self_attn
    with torch.no_grad():
        E = m.model.embed_tokens.weight
        E[:, :3] = 0
        E[:, 2] = 1.0
        E[ids] = 0
        E[ids, 0], E[ids, 2] = 1.0, 1.0
        E[colon] = 0
        E[colon, 1], E[colon, 2] = 1.0, 1.0
        att.q_proj.weight.zero_()
        att.k_proj.weight.zero_()
        for h in range(4):
            att.q_proj.weight[h * 8 + 7, 1] = plant
            att.q_proj.weight[h * 8 + 1, 1] = recency ** 0.5
        for h in range(2):
            att.k_proj.weight[h * 8 + 7, 0] = plant
            att.k_proj.weight[h * 8 + 1, 2] = recency ** 0.5
    return m


def planted_examples(gold_positions, seed=0, pairs=6):
    """Prompts asking for PLANT, its record at each gold position, the other keys drawn without PLANT."""
    rng, out = np.random.default_rng(seed), []
    words = [w for w in kv.KV_WORDS if w != PLANT]
    for p in gold_positions:
        keys = list(rng.choice(words, pairs - 1, replace=False))
        keys.insert(p, PLANT)
        values = [str(v) for v in rng.choice(np.arange(1000, 10000), pairs, replace=False)]
        out.append(kv.KVExample(tuple(zip(keys, values)), PLANT, values[p], p))
    return out


def test_planted_record_is_most_attended_and_sorted_last(tok):
    model, exs = planted_model(tok), planted_examples(range(6))
    att = bl.record_attention(model, tok, exs).sum(axis=(1, 2))  # (n, records)
    assert (att.argmax(1) == np.arange(6)).all() and (att.max(1) > 4 * np.sort(att, 1)[:, -2]).all()
    sort = bl.attention_sort(model, tok, exs, iterations=2)
    assert sort.forwards == 2 and [p[0] for p in sort.gold_path] == list(range(6))
    assert all(p[1:] == [5, 5] for p in sort.gold_path)
    for a, b in zip(exs, sort.examples):  # the same records, reordered, the gold moved along
        assert sorted(a.records) == sorted(b.records) and b.records[b.gold_index] == (PLANT, a.value)


def test_position_bias_from_dummies_and_calibrated_rerank(tok):
    model = planted_model(tok)
    calib = planted_examples([0, 1, 2, 3, 4, 5] * 2, seed=1)
    bias = bl.position_bias(model, tok, calib)
    att = bl.record_attention(model, tok, calib)
    dummy = np.ones((len(calib), 6), bool)
    dummy[np.arange(len(calib)), [ex.gold_index for ex in calib]] = False
    for k in range(6):  # the mean over the records at k that were not asked for
        np.testing.assert_allclose(bias[..., k], att[dummy[:, k], ..., k].mean(0), rtol=1e-12)
    exs = planted_examples(range(6), seed=2)
    rel = bl.calibrated_relevance(bl.record_attention(model, tok, exs), bias).sum(axis=(1, 2))
    assert (rel.argmax(1) == np.arange(6)).all()
    rr = bl.calibrated_rerank(model, tok, exs, bias)
    assert [p for p in rr.gold_path] == [[g, 5] for g in range(6)]
    with pytest.raises(ValueError, match="do not match"):
        bl.calibrated_relevance(att, bias[:, :, :3])




def test_retrieval_layer_picks_the_layer_that_finds_the_gold():
    rng = np.random.default_rng(0)
    att = rng.uniform(0.0, 1.0, size=(40, 4, 3, 6))  # (prompts, layers, heads, records)
    gold = rng.integers(0, 6, size=40)
    att[np.arange(40), 2, :, gold] += 1.0  # layer 2 peaks on the gold in every prompt
    layer, hits = bl.retrieval_layer(att, gold)
    assert layer == 2 and hits[2] == 1.0 and hits.shape == (4,) and (hits[[0, 1, 3]] < 0.6).all()
    assert bl.retrieval_layer(att.mean(axis=2), gold)[0] == 2  # head-averaged input alike
    tie = np.full((2, 3, 4), 0.1)
    tie[:, :, 1] = 1.0  # every layer peaks on record 1 alike, with the same share: the earliest wins
    layer, hits = bl.retrieval_layer(tie, [1, 1])
    assert layer == 0 and (hits == 1.0).all()
    tie[:, 2, 1] = 2.0  # same hits, a larger share of layer 2's attention on the gold: layer 2
    assert bl.retrieval_layer(tie, [1, 1])[0] == 2
    with pytest.raises(ValueError, match="gold indices must lie"):
        bl.retrieval_layer(tie, [1, 4])
    with pytest.raises(ValueError, match="do not match"):
        bl.retrieval_layer(tie, [1])


def test_layer_rerank_puts_the_layers_pick_first_or_last(tok):
    model, exs = planted_model(tok), planted_examples(range(6))
    last = bl.layer_rerank(model, tok, exs, 0, "last")
    first = bl.layer_rerank(model, tok, exs, 0, "first")
    assert last.gold_path == [[g, 5] for g in range(6)] and first.gold_path == [[g, 0] for g in range(6)]
    assert last.forwards == 1 and last.attention.shape == (6, 1, 4, 6)
    for a, b, c in zip(exs, last.examples, first.examples):  # the same records, the gold moved along
        assert sorted(a.records) == sorted(b.records) == sorted(c.records)
        assert b.records[b.gold_index] == c.records[c.gold_index] == (PLANT, a.value)
    with pytest.raises(ValueError, match="layer must be"):
        bl.layer_rerank(model, tok, exs, 1)
    with pytest.raises(ValueError, match="place"):
        bl.layer_rerank(model, tok, exs, 0, "middle")


def test_calibrated_attention_redistributes_record_attention(tok):
    """The answer rows' attention over the records becomes C * softmax(relevance / t) per layer and head (C: their
    total before), the rest of each row and every prompt row before the last stay as they were; eager = SDPA."""
    eager = tiny("llama", "eager", dtype=torch.float64, vocab_size=VOCAB)
    sdpa = tiny("llama", "sdpa", dtype=torch.float64, vocab_size=VOCAB)
    exs = examples(2)
    rng = np.random.default_rng(0)
    rel = rng.normal(0, 0.05, (len(exs), 3, 4, 5))
    ex, t = exs[1], 0.05
    ids = torch.tensor([kv.prompt_ids(tok, ex) + kv.encode(tok, " " + ex.value)[:-1]])
    P = len(kv.prompt_ids(tok, ex))
    spans = bl.record_token_spans(tok, ex)
    inside = torch.zeros(ids.shape[1], dtype=torch.bool)
    for s, e in spans:
        inside[s:e] = True
    with torch.no_grad():
        before = eager(ids, output_attentions=True)
        with bl.calibrated_attention(eager, tok, exs, rel, temperature=t):
            after = eager(ids, output_attentions=True)
            with pytest.raises(RuntimeError, match="already patched"):
                bl.calibrated_attention(eager, tok, exs, rel)
        with bl.calibrated_attention(sdpa, tok, exs, rel, temperature=t):
            after_sdpa = sdpa(ids).logits
        again = eager(ids).logits
    assert torch.equal(again, before.logits)  # removed: the model as before, bit for bit
    torch.testing.assert_close(after_sdpa, after.logits, rtol=0, atol=1e-5)  # eager's softmax is float32
    assert (after.logits[0, P - 1:] - before.logits[0, P - 1:]).abs().max() > 1e-3
    torch.testing.assert_close(after.logits[0, :P - 1], before.logits[0, :P - 1], rtol=1e-9, atol=1e-9)
    for layer, (a0, a1) in enumerate(zip(before.attentions, after.attentions)):
        w0, w1 = a0[0, :, P - 1:], a1[0, :, P - 1:]  # (H, answer rows, T)
        m0 = torch.stack([w0[..., s:e].sum(-1) for s, e in spans], -1)
        m1 = torch.stack([w1[..., s:e].sum(-1) for s, e in spans], -1)
        share = torch.softmax(torch.tensor(rel[1, layer])[:, None] / t, -1).expand_as(m1)
        torch.testing.assert_close(m1 / m1.sum(-1, keepdim=True), share, rtol=0, atol=1e-6)
        if layer == 0:  # the layer's input is unchanged: the same total C, the rest of each row as it was
            torch.testing.assert_close(w1[..., ~inside], w0[..., ~inside], rtol=0, atol=1e-6)
            torch.testing.assert_close(m1, m0.sum(-1, keepdim=True) * share, rtol=0, atol=1e-6)
            assert (m1 - m0).abs().max() > 1e-2  # and it moved
    with torch.no_grad(), bl.calibrated_attention(eager, tok, exs, rel, temperature=t, layers=[1]):
        only = eager(ids, output_attentions=True)  # layer 0 untouched; layer 1 re-weighted as before (same input)
    torch.testing.assert_close(only.attentions[0], before.attentions[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(only.attentions[1][0, :, P - 1:, inside].sum(-1),
                               before.attentions[1][0, :, P - 1:, inside].sum(-1), rtol=0, atol=1e-6)
    w = only.attentions[1][0, :, P - 1:]
    m = torch.stack([w[..., s:e].sum(-1) for s, e in spans], -1)
    share = torch.softmax(torch.tensor(rel[1, 1])[:, None] / t, -1).expand_as(m)
    torch.testing.assert_close(m / m.sum(-1, keepdim=True), share, rtol=0, atol=1e-6)


def test_refusals(tok):
    model, exs = tiny("llama", "eager", dtype=torch.float64, vocab_size=VOCAB), examples(1)
    rel = np.zeros((len(exs), 3, 4, 5))
    with pytest.raises(ValueError, match="temperature"):
        bl.calibrated_attention(model, tok, exs, rel, temperature=0)
    with pytest.raises(ValueError, match="relevance"):
        bl.calibrated_attention(model, tok, exs, rel[:, :2])
    for bad in ([], [3], [0, 0], [True]):
        with pytest.raises(ValueError, match="layers must be"):
            bl.calibrated_attention(model, tok, exs, rel, layers=bad)
    with pytest.raises(ValueError, match="iterations"):
        bl.attention_sort(model, tok, exs, iterations=0)
    with pytest.raises(TypeError, match="per head"):
        bl.record_attention(tiny("olmo2", "eager", vocab_size=VOCAB), tok, exs)
    with pytest.raises(ValueError, match="no dummy"):
        bl.position_bias(model, tok, exs[:1])


def test_driver_rows(tok, tmp_path):
    """experiments/lost_in_the_middle.py: `--rows` can name each new row; a sort row records where each gold was
    answered, its passes per prompt and the attention it measured first; a calibrated row uses the bias given."""
    import argparse
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location("lim", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                       "experiments", "lost_in_the_middle.py"))
    lim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lim)
    plan = lim.baseline_rows(argparse.Namespace(task="short", model=None), lim.TASKS["short"], None, 30)
    names = [n for n in plan if n.startswith(("attention sort", "calibrated"))]
    assert names == [f"attention sort ({lim.SORT_ROUNDS} rounds)", "calibrated rerank", "calibrated attention"]
    assert plan["retrieval-layer rerank"] == dict(calibrate="layer", calibration=lim.CALIBRATION)
    model = planted_model(tok)
    exs = planted_examples([0, 2, 4])
    base = lim.score(str(tmp_path / "none.json"), model, tok, exs, {}, batch_size=2)
    path = str(tmp_path / "sort.json")
    row = lim.score(path, model, tok, exs, dict(sort=1), base, batch_size=2, chunk=2)
    assert row["answered_gold_index"] == [5, 5, 5] and row["forwards_per_prompt"] == 2
    assert row["vs_baseline"]["n"] == 3 and json.load(open(path)) == row
    att = np.load(path.replace(".json", ".attention.npz"))["attention"]
    np.testing.assert_allclose(att, bl.record_attention(model, tok, exs).mean(axis=2), rtol=1e-6)
    bias = np.zeros((1, 4, 6))
    bias[..., 1] = -10.0  # a bias this negative makes the record at position 1 the most relevant: last, gold next
    row = lim.score(str(tmp_path / "rr.json"), model, tok, exs, dict(calibrate="rerank", bias=bias), base)
    assert row["answered_gold_index"] == [4, 4, 4] and row["forwards_per_prompt"] == 2
    how = dict(calibrate="attention", bias=bias, temperature=0.05)
    row = lim.score(str(tmp_path / "ca.json"), model, tok, exs, how, base)
    assert row["answered_gold_index"] == [0, 2, 4] and row["settings"]["temperature"] == 0.05
    assert row["logprobs"] != base["logprobs"]  # the intervention changed the answer's pass
    how = dict(calibrate="layer", layer=0, place="first")
    row = lim.score(str(tmp_path / "rl.json"), model, tok, exs, how, base, batch_size=2, chunk=2)
    assert row["answered_gold_index"] == [0, 0, 0] and row["settings"] == dict(calibrate="layer", layer=0,
                                                                               place="first")
    lengths = lim.prompt_lengths(tok, model, exs)
    assert lengths["plain"]["min"] <= lengths["plain"]["max"] < lengths["query_aware"]["max"]
    assert lengths["plain"]["min"] == min(len(kv.prompt_ids(tok, ex)) + len(kv.encode(tok, " " + ex.value))
                                          for ex in exs)


def test_driver_rows_dtype_needs_its_own_out(monkeypatch, capsys):
    """Rows in another dtype go to a folder of their own: a table pairs its rows in one dtype."""
    import importlib.util
    import os
    import sys

    spec = importlib.util.spec_from_file_location("lim", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                       "experiments", "lost_in_the_middle.py"))
    lim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lim)
    for extra in ([], ["--out", lim.default_out("edge")]):
        monkeypatch.setattr(sys, "argv", ["lost_in_the_middle.py", "edge", "--rows-dtype", "bfloat16", *extra])
        with pytest.raises(SystemExit):
            lim.main()
        assert "--out of its own" in capsys.readouterr().err
