"""Extrapolation: the passkey generator, one-forward scoring, and per-layer factors composed with every base
rope_type at lengths beyond max_position_embeddings (tiny random Llamas, no downloads, a few seconds)."""

import inspect
import json

import numpy as np
import pytest
import torch

import layer_rope as ex  # after the merge: `import layer_rope as ex`
import layer_rope as lr
from conftest import tiny_llama

MAXPOS = 32  # tiny models' trained context
SEQ = 56  # > MAXPOS: every test below runs beyond it
HEAD_DIM = 16  # hidden 64 / 4 heads


class CharTokenizer:
    """Stand-in tokenizer for tiny models: one token per character, ids 1..100 (vocab 101)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 100 + 1 for c in text]}

    def decode(self, ids):
        raise NotImplementedError


# -- passkey generator ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens,depth", [(400, 0.0), (400, 0.5), (1000, 0.9), (1000, 1.0)])
def test_passkey_example_layout(n_tokens, depth):
    tok = CharTokenizer()
    e = ex.make_passkey_example(tok, n_tokens, depth, seed=3, index=1)
    assert len(e.input_ids) == e.n_tokens == n_tokens and len(e.full_ids) == n_tokens + 1
    assert len(e.key) == 5 and e.key.isdigit() and e.key[0] != "0"
    full = list(e.full_ids)
    assert full[e.answer_start:] == tok(" " + e.key)["input_ids"]  # the last tokens are the answer
    needle = tok(" " + ex.PASSKEY_NEEDLE.format(key=e.key))["input_ids"]
    assert full[e.needle_start:e.needle_start + len(needle)] == needle
    (s1, e1), (s2, e2) = e.haystack_spans
    assert e1 == e.needle_start and s2 == e.needle_start + len(needle)
    hay = e1 - s1 + e2 - s2
    assert abs((e1 - s1) - depth * hay) <= 0.5  # needle at the requested depth of the haystack
    question = tok("\n" + ex.PASSKEY_QUESTION)["input_ids"]
    assert full[e2:e2 + len(question)] == question and e2 + len(question) == e.answer_start
    unit = tok(" " + ex.PASSKEY_FILLER)["input_ids"]
    assert full[s1:e1] + full[s2:e2] == (unit * (hay // len(unit) + 1))[:hay]  # the classic filler, in order


def test_passkey_examples_deterministic_and_distinct():
    tok = CharTokenizer()
    a = ex.make_passkey_examples(tok, 300, 4, seed=0)
    b = ex.make_passkey_examples(tok, 300, 4, seed=0)
    c = ex.make_passkey_examples(tok, 300, 4, seed=1)
    assert a == b
    assert len({e.key for e in a}) == 4 and [e.key for e in a] != [e.key for e in c]
    np.testing.assert_allclose([e.depth for e in a], np.linspace(0.1, 0.9, 4))
    assert a[0].needle_start < a[1].needle_start < a[2].needle_start < a[3].needle_start
    with pytest.raises(ValueError):
        ex.make_passkey_example(tok, 20, 0.5)  # too short for the fixed parts
    with pytest.raises(ValueError):
        ex.make_passkey_example(tok, 300, 1.5)


def test_passkey_prose_haystack_is_a_pydoc_slice():
    tok = CharTokenizer()
    e = ex.make_passkey_example(tok, 600, 0.3, seed=0, index=2, haystack="pydoc")
    src = ex.haystack_tokens(tok, "pydoc")
    (s1, e1), (s2, e2) = e.haystack_spans
    assert list(e.full_ids[s1:e1]) + list(e.full_ids[s2:e2]) == src[e.offset:e.offset + (e1 - s1) + (e2 - s2)]
    assert e.offset > 0 and "The pass key is" in ex.passkey_prompt(e.key, "a", "b")


def test_passkey_and_ppl_matches_full_logits():
    """The selective lm_head gives the same NLLs and argmaxes as a plain full-logits forward."""
    tok = CharTokenizer()
    model = tiny_llama(seed=1, max_position_embeddings=MAXPOS)
    e = ex.make_passkey_example(tok, 600, 0.4, seed=0)
    r = ex.passkey_and_ppl(model, e, ppl_positions=50)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor(e.input_ids)[None]).logits[0].double(), -1)
    full = torch.tensor(e.full_ids)
    targets = ex._ppl_targets(e, 50)
    assert len(targets) == r["ppl_n"] == 50
    nll = -logp[targets - 1, full[targets]]
    assert r["ppl"] == pytest.approx(float(torch.exp(nll.mean())), rel=1e-4)
    ans = np.arange(e.answer_start, len(e.full_ids))
    assert r["answer_logprob"] == pytest.approx(float(logp[ans - 1, full[ans]].sum()), abs=1e-3)
    assert r["correct"] == bool((logp[ans - 1].argmax(-1) == full[ans]).all())


# -- methods --------------------------------------------------------------------------------------

def test_method_rope_coincide_inside_context():
    for m in ex.EXTRAPOLATION_METHODS:
        rp, layer = ex.method_rope(m, 8192, 8192, 1e5)
        assert rp is None and layer == m.endswith("+layer")
    assert ex.method_rope("pi", 16384, 8192, 1e5)[0] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}
    assert ex.method_rope("pi+layer", 12288, 8192, 1e5)[0]["factor"] == 1.5
    assert ex.method_rope("ntk+layer", 16384, 8192, 1e5, 2.0) == (
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e5}, True)
    with pytest.raises(ValueError):
        ex.method_rope("yarn", 16384, 8192, 1e5)


def test_default_profile_keeps_sensitive_layer():
    f = ex.default_extrapolation_factors(30)
    assert len(f) == 30 and f[:17] == [1.0] * 17  # layers 0..16 untouched
    assert f[-1] == pytest.approx(1.5) and all(b > a for a, b in zip(f[16:], f[17:]))


def test_dynamic_ntk_at_trained_length_is_unscaled():
    """Why pi/ntk rows share the unscaled forward at L <= max_position_embeddings."""
    ids = torch.randint(1, 101, (1, MAXPOS))
    plain = tiny_llama(seed=2, max_position_embeddings=MAXPOS)
    dyn = tiny_llama(seed=2, max_position_embeddings=MAXPOS,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, dyn(input_ids=ids).logits)
        longer = torch.randint(1, 101, (1, SEQ))
        assert not torch.equal(plain(input_ids=longer).logits, dyn(input_ids=longer).logits)


# -- per-layer factors composed with each base rope_type, beyond max_position_embeddings -----------

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": MAXPOS, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": MAXPOS // 2,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.5 + 0.5 * i for i in range(HEAD_DIM // 2)]},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": MAXPOS // 2, "rope_theta": 10000.0},
}
FACTORS = [1.0, 2.5, 1.0, 1.75]  # 4 layers


def _model(rope_type):
    return tiny_llama(seed=4, max_position_embeddings=MAXPOS, rope_parameters=dict(ROPE_PARAMETERS[rope_type]))


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_per_layer_factors_compose_with_base_rope_type(rope_type):
    model = _model(rope_type)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == rope_type
    ids = torch.randint(1, 101, (1, SEQ))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        inv_freq_plain = rotary.inv_freq.clone()
        with lr.scaled(model, [1.0] * 4):
            ones = model(input_ids=ids).logits
        assert torch.equal(plain, ones)  # all-ones factors: bit for bit the unpatched model

        received = {}
        with lr.scaled(model, FACTORS):
            hooks = [layer.register_forward_pre_hook(  # registered after apply: sees what the layer gets
                (lambda i: lambda mod, args, kw: received.__setitem__(i, kw["position_embeddings"]))(i),
                with_kwargs=True) for i, layer in enumerate(model.model.layers)]
            scaled_logits = model(input_ids=ids).logits
            for h in hooks:
                h.remove()
        assert not torch.allclose(plain, scaled_logits, atol=1e-4)
        # beyond max_position_embeddings the rope module's state is the long-context one it computed itself
        torch.testing.assert_close(rotary.inv_freq, inv_freq_plain, rtol=0, atol=0)
        raw = inspect.unwrap(type(rotary).forward)  # the rope module's formula, without its dynamic update
        x = torch.zeros(1, dtype=torch.float32)
        pos = torch.arange(SEQ)[None]
        own_cos, own_sin = raw(rotary, x, pos)
        for i, s in enumerate(FACTORS):
            cos, sin = received[i]
            want_cos, want_sin = raw(rotary, x, pos.float() / s)  # the rope_type's cos/sin at positions m / s
            torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-5)
            torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-5)
            if s == 1.0:
                assert torch.equal(cos, own_cos) and torch.equal(sin, own_sin)
            else:
                assert not torch.allclose(cos, own_cos, atol=1e-3)


def test_long_context_state_is_used_for_dynamic_and_longrope():
    """At SEQ > max_position_embeddings, dynamic grows its base and longrope switches to long factors; the
    patched layers must scale THOSE frequencies, not the ones the module started with."""
    for rope_type in ("dynamic", "longrope"):
        model = _model(rope_type)
        rotary = model.model.rotary_emb
        start = rotary.inv_freq.clone()
        received = {}
        with torch.no_grad(), lr.scaled(model, FACTORS):
            h = model.model.layers[1].register_forward_pre_hook(
                lambda mod, args, kw: received.__setitem__(1, kw["position_embeddings"]), with_kwargs=True)
            model(input_ids=torch.randint(1, 101, (1, SEQ)))
            h.remove()
        assert not torch.equal(rotary.inv_freq, start), rope_type  # the module did update its frequencies
        m = SEQ - 1
        angle = m / FACTORS[1] * rotary.inv_freq.double()
        want = torch.cat([angle, angle]).cos() * rotary.attention_scaling
        torch.testing.assert_close(received[1][0][0, m].double(), want, rtol=0, atol=2e-5)


def test_uniform_factor_on_default_equals_linear_beyond_context():
    ids = torch.randint(1, 101, (1, SEQ))
    default, linear = _model("default"), _model("linear")
    with torch.no_grad(), lr.scaled(default, [2.0] * 4):
        a = default(input_ids=ids).logits
    with torch.no_grad():
        b = linear(input_ids=ids).logits
    assert torch.equal(a, b)


def test_layer_factors_on_linear_equal_product_on_default():
    """PI then per-layer s_l is RoPE with position factor 2 * s_l (exactly, up to float rounding)."""
    ids = torch.randint(1, 101, (1, SEQ))
    default, linear = _model("default"), _model("linear")
    with torch.no_grad():
        with lr.scaled(linear, FACTORS):
            a = linear(input_ids=ids).logits
        with lr.scaled(default, [2.0 * f for f in FACTORS]):
            b = default(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- the table driver, end to end on a tiny model ---------------------------------------------------

def test_extrapolation_table_shares_coinciding_methods_and_resumes(tmp_path):
    tok = CharTokenizer()
    loads = []

    def load(rp):
        loads.append(rp)
        kw = {} if rp is None else {"rope_parameters": rp}
        return tiny_llama(seed=5, max_position_embeddings=MAXPOS, **kw), tok

    # lengths are well beyond the tiny context except 32; the fixed prompt parts need ~250 characters
    log = tmp_path / "x.jsonl"
    recs = ex.extrapolation_table([MAXPOS * 9, MAXPOS * 12], {MAXPOS * 9: 2, MAXPOS * 12: 1},
                                  ex.default_extrapolation_factors(4), log_path=str(log), load=load,
                                  ppl_positions=64, log=lambda *a: None)
    assert len(recs) == 5 * 2 + 5  # five distinct methods at both lengths (both > MAXPOS)
    assert sorted(len(r["methods"]) for r in recs) == [1] * 15
    assert {json.loads(r["method_key"])[0]["rope_type"] for r in recs if json.loads(r["method_key"])[0]} == \
        {"linear", "dynamic"}
    rows = ex.summarize_extrapolation(recs)
    assert {(r["length"], r["method"]): r["n"] for r in rows}[(MAXPOS * 9, "pi+layer")] == 2
    n_loads = len(loads)
    again = ex.extrapolation_table([MAXPOS * 9, MAXPOS * 12], {MAXPOS * 9: 2, MAXPOS * 12: 1},
                                   ex.default_extrapolation_factors(4), log_path=str(log), load=load,
                                   ppl_positions=64, log=lambda *a: None)
    assert len(loads) == n_loads + 1 and again == recs  # resumed from the log: no forward re-run
    # a log written with other settings is refused, not mixed into the table
    other = [1.0, 1.0, 1.25, 2.0]
    with pytest.raises(ValueError, match="different layer factors"):
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 2}, other, log_path=str(log), load=load,
                               ppl_positions=64, log=lambda *a: None)
    with pytest.raises(ValueError, match="different needle depth"):  # 3 samples: depths 0.1, 0.5, 0.9
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 3}, ex.default_extrapolation_factors(4),
                               log_path=str(log), load=load, ppl_positions=64, log=lambda *a: None)
    with pytest.raises(ValueError, match="different passkey"):
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 2}, ex.default_extrapolation_factors(4), seed=7,
                               log_path=str(log), load=load, ppl_positions=64, log=lambda *a: None)


def test_extrapolation_table_inside_context_runs_two_forwards():
    tok = CharTokenizer()
    L = 300
    recs = ex.extrapolation_table(
        [L], {L: 1}, [1.0, 2.0, 2.0, 1.0], ppl_positions=32, log=lambda *a: None,
        load=lambda rp: (tiny_llama(seed=6, max_position_embeddings=4 * L,
                                    **({} if rp is None else {"rope_parameters": rp})), tok))
    assert sorted(sorted(r["methods"]) for r in recs) == [["none", "ntk", "pi"], ["ntk+layer", "pi+layer"]]
    md = ex.extrapolation_markdown(ex.summarize_extrapolation(recs), {"max_position_embeddings": 4 * L})
    assert md.count(f"| {L} |") == 5


def test_prefix_sharing_is_exact():
    """A +layer forward that starts from the base forward's hidden states at the first scaled layer gives
    bit for bit what the full patched forward gives."""
    tok = CharTokenizer()
    model = _model("linear")
    e = ex.make_passkey_example(tok, 300, 0.5, seed=0)
    factors = [1.0, 1.0, 1.5, 2.0]
    base = ex.passkey_and_ppl(model, e, 64, capture_layer=2)
    assert base["hidden_in"].shape == (1, 300, 64)
    with lr.scaled(model, factors):
        full = ex.passkey_and_ppl(model, e, 64)
        cut = ex.passkey_and_ppl(model, e, 64, start_layer=2, hidden_in=base["hidden_in"])
    assert len(model.model.layers) == 4  # restored
    assert full["layers_run"] == 4 and cut["layers_run"] == 2
    for k in ("correct", "answer_logprob", "ppl", "ppl_tail", "nll_by_quarter"):
        assert full[k] == cut[k], k
    assert full["ppl"] != base["ppl"]


def test_cli_parser_and_recorded_command():
    import argparse

    ap = argparse.ArgumentParser()
    ex.add_extrapolate_parser(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(["extrapolate", "--lengths", "4096", "16384", "--samples", "2", "1", "--report-only"])
    assert a.func is ex.cmd_extrapolate and a.lengths == ["4096", "16384"] and a.report_only
    assert a.haystack == "classic" and a.ntk_factor == 2.0 and a.dtype == "float32"
    assert ex._reproducing_argv(["extrapolate", "--resume", "--note", "a b", "--seed", "1", "--report-only"]) == \
        ["extrapolate", "--seed", "1"]


def test_plots_leave_pyplots_backend_alone(tmp_path):
    """Writing a plot file must not switch pyplot's backend: in a notebook that would silence every later
    inline plot (the old matplotlib.use("Agg") did exactly that)."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        rows = [{"haystack": "classic", "length": L, "method": m, "answer_logprob": -1.0, "passkey_acc": 1.0,
                 "ppl": 1.1} for L in (4096, 8192) for m in ex.EXTRAPOLATION_METHODS]
        ex.plot_extrapolation(rows, str(tmp_path / "x.png"))
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "x.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)
