"""Extrapolation: the passkey generator, one-forward scoring, per-layer factors composed with every base
rope_type at lengths beyond max_position_embeddings, the table and its report, and the long-context search
fitness (tiny random Llamas, no downloads, a few seconds)."""

import inspect
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import extrapolation as ex
import layer_rope as lr
from conftest import tiny_llama

MAXPOS = 32  # tiny models' trained context
SEQ = 56  # > MAXPOS: every test below runs beyond it
HEAD_DIM = 16  # hidden 64 / 4 heads
SMOLLM2_DEPTH = 16 / 29  # SmolLM2's retrieval-critical layer 16 of 30: the CLI's default profile depth
PROFILE = ex.default_extrapolation_factors(4, SMOLLM2_DEPTH)


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
    targets = ex.ppl_targets(e, 50)
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
    f = ex.default_extrapolation_factors(30, SMOLLM2_DEPTH)
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
                                  PROFILE, log_path=str(log), load=load,
                                  ppl_positions=64, log=lambda *a: None)
    assert len(recs) == 5 * 2 + 5  # five distinct methods at both lengths (both > MAXPOS)
    assert sorted(len(r["methods"]) for r in recs) == [1] * 15
    assert {json.loads(r["method_key"])[0]["rope_type"] for r in recs if json.loads(r["method_key"])[0]} == \
        {"linear", "dynamic"}
    rows = ex.summarize_extrapolation(recs)
    assert {(r["length"], r["method"]): r["n"] for r in rows}[(MAXPOS * 9, "pi+layer")] == 2
    n_loads = len(loads)
    again = ex.extrapolation_table([MAXPOS * 9, MAXPOS * 12], {MAXPOS * 9: 2, MAXPOS * 12: 1},
                                   PROFILE, log_path=str(log), load=load,
                                   ppl_positions=64, log=lambda *a: None)
    assert len(loads) == n_loads + 1 and again == recs  # resumed from the log: no forward re-run
    # a log written with other settings is refused, not mixed into the table
    other = [1.0, 1.0, 1.25, 2.0]
    with pytest.raises(ValueError, match="different layer factors"):
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 2}, other, log_path=str(log), load=load,
                               ppl_positions=64, log=lambda *a: None)
    with pytest.raises(ValueError, match="different needle depth"):  # 3 samples: depths 0.1, 0.5, 0.9
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 3}, PROFILE,
                               log_path=str(log), load=load, ppl_positions=64, log=lambda *a: None)
    with pytest.raises(ValueError, match="different passkey"):
        ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 2}, PROFILE, seed=7,
                               log_path=str(log), load=load, ppl_positions=64, log=lambda *a: None)
    # remeasure_layer: the +layer forwards of other factors are measured again, the base forwards reused
    said = []
    redone = ex.extrapolation_table([MAXPOS * 9, MAXPOS * 12], {MAXPOS * 9: 2, MAXPOS * 12: 1}, other,
                                    log_path=str(log), load=load, ppl_positions=64, log=said.append,
                                    remeasure_layer=True)
    assert any("6 +layer records of other factors dropped" in m for m in said)
    layered = [i for i, r in enumerate(recs) if "factors_sha" in r]
    assert len(layered) == 6 and all(redone[i] == r for i, r in enumerate(recs) if i not in layered)
    assert {redone[i]["factors_sha"] for i in layered} == {ex._fingerprint(other)} != {recs[layered[0]]["factors_sha"]}
    assert len(log.read_text().splitlines()) == len(recs)  # replaced in the log, not appended beside
    n_loads = len(loads)
    assert ex.extrapolation_table([MAXPOS * 9, MAXPOS * 12], {MAXPOS * 9: 2, MAXPOS * 12: 1}, other,
                                  log_path=str(log), load=load, ppl_positions=64, log=lambda *a: None,
                                  remeasure_layer=True) == redone and len(loads) == n_loads + 1  # all reused


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


def test_extrapolation_table_runs_only_the_methods_asked_for():
    tok = CharTokenizer()
    def load(rp):
        kw = {} if rp is None else {"rope_parameters": rp}
        return tiny_llama(seed=6, max_position_embeddings=MAXPOS, **kw), tok

    recs = ex.extrapolation_table([MAXPOS * 9], {MAXPOS * 9: 2}, PROFILE, ppl_positions=32,
                                  log=lambda *a: None, methods=("ntk", "ntk+layer"), load=load)
    assert [r["methods"] for r in recs] == [["ntk"], ["ntk+layer"]] * 2
    assert [(p["base"], p["n"]) for p in ex.paired_differences(recs)] == [("ntk", 2)]


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
    ap = ex.build_parser()
    a = ap.parse_args(["table", "--lengths", "4096", "16384", "--samples", "2", "1", "--report-only"])
    assert a.func is ex.cmd_table and a.lengths == ["4096", "16384"] and a.report_only
    assert a.haystack == "classic" and a.ntk_factor == 2.0 and a.dtype == "float32"
    assert ap.parse_args(["table"]).samples == ["3", "2", "2", "1"] and a.seed == ex.HELDOUT_SEED == 0
    assert ex.reproducing_argv(["table", "--resume", "--note", "a b", "--seed", "1", "--report-only"]) == \
        ["table", "--seed", "1"]
    s = ap.parse_args(["search", "--method", "pi", "--length", "12288", "--needles", "6", "--seed", "3",
                       "--population", "10", "--generations", "5", "--dtype", "bfloat16"])
    assert s.func is ex.cmd_search
    assert (s.method, s.length, s.needles, s.seed, s.needle_seed) == ("pi", [12288], 6, 3, 1)
    assert (s.population, s.generations, s.dtype, s.out) == (10, 5, "bfloat16", None)


def test_plots_leave_pyplots_backend_alone(tmp_path):
    """Writing a plot file must not switch pyplot's backend: in a notebook that would silence every later
    inline plot (the old matplotlib.use("Agg") did exactly that)."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        rows = [{"haystack": "classic", "length": L, "method": m, "answer_logprob": -1.0, "passkey_acc": 1.0,
                 "ppl": 1.1} for L in (4096, 8192) for m in ex.EXTRAPOLATION_METHODS]
        ex.plot_extrapolation(rows, str(tmp_path / "x.png"), title="test", trained_context=6000)
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "x.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)


def test_pydoc_haystack_cache_is_per_tokenizer_object():
    """The pydoc token cache is keyed on the tokenizer object (functools.cache keeps it alive), not on id():
    a tokenizer created after another was garbage-collected can reuse its id, and got its tokens."""
    first = ex.haystack_tokens(CharTokenizer(), "pydoc")  # the tokenizer is freed right after this line

    class Shifted(CharTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [i % 100 + 1 for i in super().__call__(text)["input_ids"]]}

    shifted = ex.haystack_tokens(Shifted(), "pydoc")
    assert shifted == [i % 100 + 1 for i in first] and shifted != first


# -- paired differences --------------------------------------------------------------------------------

def _record(length, example, methods, logprob):
    return {"haystack": "classic", "length": length, "example": example, "methods": methods,
            "answer_logprob": logprob, "correct": False, "ppl": 2.0, "ppl_tail": 2.0, "seconds": 1.0,
            "layers_run": 4}


def test_paired_differences_t_interval():
    from scipy import stats

    base = [-3.0, -2.0, -5.0, -1.0]
    layer = [-2.0, -2.5, -1.0, -1.0]
    recs = [_record(400, i, ["ntk"], b) for i, b in enumerate(base)]
    recs += [_record(400, i, ["ntk+layer"], v) for i, v in enumerate(layer)]
    recs += [_record(400, 0, ["pi"], -9.0), _record(400, 0, ["pi+layer"], -8.0)]  # one needle: no interval
    paired = {p["base"]: p for p in ex.paired_differences(recs)}
    d = np.subtract(layer, base)
    p = paired["ntk"]
    assert p["differences"] == d.tolist() and p["n"] == 4 and p["mean"] == pytest.approx(d.mean())
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert p["interval"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert (p["helped"], p["hurt"]) == (2, 1)
    assert paired["pi"]["n"] == 1 and paired["pi"]["interval"] is None and paired["pi"]["mean"] == 1.0
    md = ex.extrapolation_markdown(ex.summarize_extrapolation(recs), {"max_position_embeddings": 32},
                                   ex.paired_differences(recs))
    assert "## Paired" in md and "| classic | 400 | ntk+layer - ntk | 4 | +1.12 |" in md


def test_paired_needles_any_two_variants():
    a = {(400, i): {**_record(400, i, ["ntk"], v), "key": str(i), "correct": i > 0, "ppl": 2.0}
         for i, v in enumerate([-1.0, -2.0, -0.5])}
    b = {(400, i): {**_record(400, i, ["ntk"], v), "key": str(i), "correct": i == 2, "ppl": 2.5}
         for i, v in enumerate([-2.0, -1.5, -1.5, -9.0])}  # needle 3: b only, not paired
    p = ex.paired_needles(a, b)
    assert p["needles"] == [(400, 0), (400, 1), (400, 2)] and p["differences"] == [1.0, -0.5, 1.0]
    assert (p["helped"], p["hurt"], p["retrieved"]) == (2, 1, [2, 1]) and p["ppl_lower"] == 3
    assert p["log_ppl_mean"] == pytest.approx(math.log(2.0 / 2.5)) and p["interval"][0] < p["mean"] < p["interval"][1]
    b[(400, 1)]["key"] = "other"
    with pytest.raises(ValueError, match="different passkeys"):
        ex.paired_needles(a, b)
    assert ex.paired_needles(a, {})["n"] == 0


# -- the long-context search fitness ---------------------------------------------------------------

LONG = 300  # tokens: far beyond MAXPOS, room for the fixed prompt parts (~250 characters)


def tiny_load(rope_parameters):
    """A picklable loader for the objective: the same tiny Llama with the given rope_parameters."""
    kw = {} if rope_parameters is None else {"rope_parameters": rope_parameters}
    return tiny_llama(seed=7, max_position_embeddings=MAXPOS, **kw), CharTokenizer()


def _objective(**kw):
    settings = {"method": "ntk", "length": LONG, "needles": 3, "seed": 1, "ppl_positions": 64, "load": tiny_load}
    return ex.PasskeyObjective(**{**settings, **kw})


def test_passkey_fitness_orders_by_retrieved_keys_first():
    n = 5
    for c in range(n):
        assert ex.passkey_fitness(c + 1, n, -1e3) > ex.passkey_fitness(c, n, 0.0)
        weight = 0.99 / (n * (n + 1))  # below the documented bound: the penalty cannot reorder either
        assert ex.passkey_fitness(c + 1, n, -1e3, 1e3, weight) > ex.passkey_fitness(c, n, 0.0, 0.0, weight)
    assert ex.passkey_fitness(n, n, 0.0) == 1 + 1 / (n + 1)
    want = 0.5 + 0.1 - 0.2 * 0.75
    assert ex.passkey_fitness(2, 4, math.log(0.5), math.log(4.0), 0.2) == pytest.approx(want)


def test_objective_is_deterministic_and_all_ones_is_the_base_method():
    obj = _objective()
    f = [1.0, 1.5, 1.25, 2.0]
    assert obj(f) == obj(f) and obj([1.0] * 4) != obj(f)
    # all-ones = the base method alone, scored by hand on the same needles (seed 1, depths 0.1, 0.5, 0.9)
    trained = tiny_load(None)[0].config
    rope = ex.method_rope("ntk", LONG, MAXPOS, trained.rope_parameters["rope_theta"]).rope_parameters
    assert rope["rope_type"] == "dynamic"
    model, tok = tiny_load(rope)
    needles = ex.make_passkey_examples(tok, LONG, 3, seed=1)
    rs = [ex.passkey_and_ppl(model, e, 64) for e in needles]
    per_token = sum(r["answer_logprob"] for r in rs) / sum(len(e.answer_ids) for e in needles)
    want = sum(r["correct"] for r in rs) / 3 + math.exp(per_token) / 4
    assert obj([1.0] * 4) == want
    penalised = _objective(ppl_weight=0.01)
    nll = np.mean([math.log(r["ppl"]) for r in rs])
    assert penalised([1.0] * 4) == pytest.approx(want - 0.01 * (1 - math.exp(-nll)), abs=1e-12)
    assert _objective(method="pi").prepared()[0].config.rope_parameters["rope_type"] == "linear"
    assert pickle.loads(pickle.dumps(obj)) == obj  # a process pool can ship it
    with pytest.raises(ValueError, match="held-out"):
        _objective(seed=ex.HELDOUT_SEED)


def test_objective_racing_stops_early_below_the_bar(monkeypatch):
    obj = _objective()
    f = [1.0, 1.5, 1.25, 2.0]
    full = obj.score(f)
    assert full["scored"] == 3 and not full["raced"]
    assert full["correct"] == 0  # random weights retrieve nothing
    calls = []
    real = ex.passkey_and_ppl
    monkeypatch.setattr(ex, "passkey_and_ppl", lambda *a, **k: calls.append(1) or real(*a, **k))
    bar = 0.9  # after 2 misses of 3 the best reachable is 1/3 + 1/4 < 0.9
    raced = obj.score(f, bar=bar)
    assert raced["raced"] and raced["scored"] == len(calls) == 2 < 3
    assert raced["fitness"] == pytest.approx(1 / 3 + 1 / 4) and full["fitness"] <= raced["fitness"] < bar
    assert obj(f, bar=full["fitness"]) == full["fitness"]  # a reachable bar: every needle scored, same value


def test_objective_over_several_lengths_scores_needles_at_each():
    one, two = _objective(needles=2), _objective(needles=2, length=(LONG, LONG + 40))
    assert one.describe()["length"] == LONG and two.describe()["length"] == [LONG, LONG + 40]
    _, _, needles = two.prepared()
    assert [e.n_tokens for e in needles] == [LONG, LONG, LONG + 40, LONG + 40]
    assert len({e.key for e in needles}) == 4  # no key repeats across lengths
    assert [e.key for e in needles[:2]] == [e.key for e in one.prepared()[2]]  # the first length = one length
    f = [1.0, 1.5, 1.25, 2.0]
    full = two.score(f)
    assert full["scored"] == 4 and full["fitness"] == pytest.approx(full["correct"] / 4 + math.exp(
        full["key_logprob_per_token"]) / 5)
    with pytest.raises(ValueError, match="PI's factor depends on the length"):
        _objective(method="pi", length=(LONG, LONG + 40))
    with pytest.raises(ValueError, match="different lengths"):
        _objective(length=(LONG, LONG))


class _KilledAfter:
    """The objective, raising KeyboardInterrupt (as Ctrl-C would) once `limit` evaluations have finished."""

    def __init__(self, objective, limit):
        self.objective, self.limit, self.calls = objective, limit, 0

    def __call__(self, factors):
        if self.calls == self.limit:
            raise KeyboardInterrupt
        self.calls += 1
        return self.objective(factors)


def test_search_killed_and_resumed_equals_uninterrupted(tmp_path):
    obj = _objective(needles=2)
    cfg = lr.GAConfig(num_layers=4, num_points=3, population=4, generations=3, seed=0)
    tag = {"fitness": "passkey", **obj.describe()}
    whole = lr.genetic_search(obj, cfg, checkpoint=str(tmp_path / "a.json"), tag=tag, progress=False)
    killed = _KilledAfter(obj, 5)
    with pytest.raises(KeyboardInterrupt):
        lr.genetic_search(killed, cfg, checkpoint=str(tmp_path / "b.json"), tag=tag, progress=False)
    rest = _KilledAfter(obj, 10 ** 6)
    again = lr.genetic_search(rest, cfg, checkpoint=str(tmp_path / "b.json"), tag=tag, progress=False)
    assert (again.best, again.fitness, again.factors) == (whole.best, whole.fitness, whole.factors)
    assert again.history == whole.history
    assert [e[:2] for e in again.evaluations] == [e[:2] for e in whole.evaluations]
    assert rest.calls == len(whole.evaluations) - 5  # nothing evaluated twice
    with pytest.raises(ValueError, match="different fitness"):  # another needle seed: refused
        lr.genetic_search(obj, cfg, checkpoint=str(tmp_path / "b.json"), progress=False,
                          tag={"fitness": "passkey", **_objective(needles=2, seed=2).describe()})


# -- the command line, end to end on a tiny saved model ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory with a one-token-per-character tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}  # 97 ids < vocab 101
    chars_only = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one per character
    tok = PreTrainedTokenizerFast(tokenizer_object=chars_only, unk_token="<unk>")
    tiny_llama(seed=8, max_position_embeddings=MAXPOS).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def assert_close(got, want, path="", rel=1e-6):
    """got == want with numbers compared to `rel`, through nested dicts and lists (pytest.approx takes no
    nested dicts since pytest 9)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}", rel)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]", rel)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_cli_search_then_heldout_table(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "search.json")
    common = ["--model", tiny_model_dir, "--ppl-positions", "32", "--threads", "1"]
    search = ["search", "--method", "ntk", "--length", str(LONG), "--needles", "2", "--population", "3",
              "--generations", "2", "--freeze", "none", "--points", "3", "--no-progress", "--out", out,
              *common]
    with pytest.raises(SystemExit, match="held-out"):
        ex.main(search + ["--needle-seed", "0"])
    with pytest.raises(SystemExit, match="at least 1"):
        ex.main(search + ["--max-evaluations", "0"])
    stopped = ex.main(search + ["--max-evaluations", "2"])  # stopped early; the same command goes on
    part = stopped["result"]
    assert part["stopped_early"] and len(part["evaluations"]) == 2 and stopped["base_method_alone_from"] is None
    record = ex.main(search)
    assert record["base_method_alone"] == stopped["base_method_alone"] and record["base_method_alone_from"] == out
    assert not record["result"]["stopped_early"] and record["result"]["evaluations"][:2] == part["evaluations"]
    factors, doc = lr.load_factors(out, 4, with_metadata=True)
    assert factors == doc["result"]["factors"] and doc["control_points"] == doc["result"]["control_points"]
    assert doc["objective"]["seed"] == 1 and doc["heldout_seed"] == 0 and doc["objective"]["method"] == "ntk"
    assert set(doc["timings_s"]) == {"model load", "GA (resumed from a checkpoint)"}  # base: recorded
    # rounded to 0.1 s: a fast CPU may record 0.0 (never assert speed); the whole covers its steps
    assert doc["wall_s"] >= 0 and doc["wall_s"] + 0.1 * len(doc["timings_s"]) >= sum(doc["timings_s"].values())
    assert doc["run"]["dtype"] == "float32" and "peak_rss_mb" in doc["run"]
    assert len(doc["result"]["history"]) == 2
    assert doc["base_method_alone"]["fitness"] == pytest.approx(record["base_method_alone"]["fitness"])
    assert os.path.exists(str(tmp_path / "search.ckpt.json"))
    assert ex.main(search)["result"] == record["result"]  # a finished checkpoint: resumed, nothing new
    with open(out) as f:
        doc = json.load(f)
    doc["objective"]["ntk_factor"] = 3.0  # a record of another objective at OUT: its base is scored afresh
    with open(out, "w") as f:
        json.dump(doc, f)
    again = ex.main(search)
    assert again["base_method_alone_from"] is None and "base method alone" in again["timings_s"]
    same = {k: v for k, v in record["base_method_alone"].items() if k != "seconds"}
    assert_close({k: again["base_method_alone"][k] for k in same}, same)

    prefix = str(tmp_path / "table")
    table = ["table", "--lengths", str(LONG), "--samples", "2", "--factors", out, "--out", prefix, *common]
    res = ex.main(table)
    assert len(res["records"]) == 5 * 2 and {r["example"] for r in res["records"]} == {0, 1}
    searched = ex.make_passkey_examples(CharTokenizer(), LONG, 2, seed=1)
    assert {r["key"] for r in res["records"]}.isdisjoint(e.key for e in searched)
    paired = {p["base"]: p for p in res["paired"]}
    assert set(paired) == {"pi", "ntk"} and paired["ntk"]["n"] == 2 and len(paired["ntk"]["interval"]) == 2
    md = open(prefix + ".md").read()
    assert "## Paired" in md and "ntk+layer - ntk" in md and os.path.getsize(prefix + ".png") > 1000
    assert res["meta"]["command"].endswith(" ".join(table)) and "peak_rss_mb" in res["meta"]
    capsys.readouterr()
    again = ex.main(table[:-len(common)] + ["--model", tiny_model_dir, "--report-only"])  # no forwards
    assert [again[k] for k in ("records", "rows", "paired")] == [res[k] for k in ("records", "rows", "paired")]
    assert again["meta"]["command"] == res["meta"]["command"]
    assert "--report-only" in again["meta"]["report_command"]
    with pytest.raises(SystemExit, match="other layer factors"):
        ex.main(["table", "--factors", "profile", "--out", prefix, "--model", tiny_model_dir,
                 "--report-only"])
    redo = table[:table.index("--factors")] + ["--factors", "profile"] + table[table.index("--out"):]
    redone = ex.main(redo + ["--remeasure-layer"])  # the profile's +layer rows measured, the base rows kept
    assert [r for r in redone["records"] if "factors_sha" not in r] == \
        [r for r in res["records"] if "factors_sha" not in r]
    shas = [{r["factors_sha"] for r in doc["records"] if "factors_sha" in r} for doc in (res, redone)]
    assert len(shas[1]) == 1 and shas[0] != shas[1]
    assert "--remeasure-layer" not in redone["meta"]["command"] and redone["meta"]["command"].endswith(" ".join(redo))
    base_only = ex.main(["table", "--lengths", str(LONG), "--samples", "1", "--methods", "ntk",
                         "--out", str(tmp_path / "ntk-only"), *common])  # no +layer forward: no factors named
    assert [r["methods"] for r in base_only["records"]] == [["ntk"]]
    assert base_only["meta"]["factors"] is None and base_only["meta"]["factors_source"].startswith("none")


def test_cli_search_over_two_lengths(tiny_model_dir, tmp_path):
    out = str(tmp_path / "two.json")
    ex.main(["search", "--length", str(LONG), str(LONG + 40), "--needles", "1", "--population", "3",
             "--generations", "1", "--freeze", "none", "--points", "3", "--no-progress", "--out", out,
             "--model", tiny_model_dir, "--ppl-positions", "16", "--threads", "1"])
    _, doc = lr.load_factors(out, 4, with_metadata=True)
    assert doc["objective"]["length"] == [LONG, LONG + 40] and doc["base_method_alone"]["scored"] == 2
    with pytest.raises(ValueError, match="PI's factor"):
        ex.main(["search", "--method", "pi", "--length", str(LONG), str(LONG + 40), "--out", out,
                 "--model", tiny_model_dir])
