"""Bad input is refused with an error that names the problem, and leaves the model untouched (issue 4)."""

import json
import math

import numpy as np
import pytest
import torch

import layer_rope as lr
from tiny_models import ids, maxdiff, single_thread, tiny  # noqa: F401

L = 3


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def x():
    return ids()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_untouched(model):
    assert not hasattr(model, "_layer_rope_handle")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "hooks left behind"


# -- factors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factors,exc,words", [
    ([2.0] * (L + 1), ValueError, "got 4 factors for a model with 3 decoder layers"),
    ([2.0] * (L - 1), ValueError, "got 2 factors for a model with 3 decoder layers"),
    ([], ValueError, "got 0 factors"),
    ([1.0, float("nan"), 1.0], ValueError, "factor 1 is not finite: nan"),
    ([1.0, 1.0, float("inf")], ValueError, "factor 2 is not finite: inf"),
    ([-math.inf, 1.0, 1.0], ValueError, "factor 0 is not finite: -inf"),
    ([1.0, 0.0, 1.0], ValueError, "factor 1 must be positive, got 0.0"),
    ([1.0, 2.0, -2.0], ValueError, "factor 2 must be positive, got -2.0"),
    ([1.0, "2", 1.0], TypeError, "factor 1 is not a real number: '2'"),
    ([1.0, None, 1.0], TypeError, "factor 1 is not a real number: None"),
    ([True, 1.0, 1.0], TypeError, "factor 0 is not a real number: True"),
    ([1.0, 2 + 0j, 1.0], TypeError, "factor 1 is not a real number"),
    ("2.0", TypeError, "factors must be a sequence of numbers, got str"),
    (2.0, TypeError, "factors must be a sequence of numbers, got float"),
    ({0: 2.0}, TypeError, "factors must be a sequence of numbers, got dict"),
])
def test_bad_factors_are_refused_and_model_untouched(model, x, factors, exc, words):
    before = logits(model, x)
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        lr.apply(model, factors)
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        with lr.scaled(model, factors):
            pytest.fail("the block must not run")
    assert_untouched(model)
    assert torch.equal(logits(model, x), before)


def test_factor_arrays_and_tensors_are_accepted(model, x):
    want = None
    for f in ([2.0, 1.0, 3.0], (2, 1, 3), np.array([2.0, 1.0, 3.0]), torch.tensor([2.0, 1.0, 3.0]),
              np.array([2, 1, 3], dtype=np.int64)):
        with lr.scaled(model, f) as h:
            assert h.factors == [2.0, 1.0, 3.0] and all(type(v) is float for v in h.factors)
            got = logits(model, x)
        want = got if want is None else want
        assert torch.equal(got, want)


def test_set_factors_refuses_bad_factors_and_keeps_the_old_ones(model, x):
    with lr.scaled(model, [2.0, 2.0, 2.0]) as h:
        before = logits(model, x)
        for bad, words in [([2.0] * 4, "got 4 factors"), ([2.0, math.nan, 2.0], "not finite"),
                           ([2.0, 2.0, 0.0], "must be positive")]:
            with pytest.raises(ValueError, match=words):
                h.set_factors(bad)
            assert h.factors == [2.0, 2.0, 2.0]
            assert torch.equal(logits(model, x), before)
        h.set_factors([1.0, 1.0, 4.0])  # and a good change takes effect in place
        assert maxdiff(logits(model, x), before) > 1e-3
    assert_untouched(model)


# -- already patched ------------------------------------------------------------------------------

def test_applying_twice_is_refused_and_the_first_patch_stays(model, x):
    plain = logits(model, x)
    h = lr.apply(model, [2.0, 3.0, 1.0])
    try:
        patched = logits(model, x)
        with pytest.raises(RuntimeError, match="already patched by layer_rope.*remove.*set_factors"):
            lr.apply(model, [1.5] * L)
        with pytest.raises(RuntimeError, match="already patched"):
            with lr.scaled(model, [1.5] * L):
                pytest.fail("the block must not run")
        assert h.active and model._layer_rope_handle is h
        assert torch.equal(logits(model, x), patched)  # still the first factors, applied once
    finally:
        h.remove()
    assert_untouched(model)
    assert torch.equal(logits(model, x), plain)
    with lr.scaled(model, [1.5] * L):  # after remove() a new patch is welcome
        assert maxdiff(logits(model, x), plain) > 1e-3
    h.remove()  # removing twice is harmless
    assert_untouched(model)


# -- exceptions inside scaled(...) ----------------------------------------------------------------

def test_exception_inside_scaled_restores_the_model_bitwise(model, x):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # includes the non-persistent inv_freq
    before = logits(model, x)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with lr.scaled(model, [2.0, 4.0, 8.0]):
            assert maxdiff(logits(model, x), before) > 1e-3
            raise Boom
    with pytest.raises(IndexError):  # an error raised inside the model's forward, mid-pass
        with lr.scaled(model, [2.0, 4.0, 8.0]):
            logits(model, torch.tensor([[5, 6, 1000]]))  # token id out of the 100-token vocabulary
    assert_untouched(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.equal(logits(model, x), before)


def test_foreign_position_embeddings_are_refused_not_silently_unscaled(model):
    """A decoder layer called directly with cos/sin that the hooked rotary module did not make cannot be
    scaled exactly; the patch says so instead of passing them through."""
    layer = model.model.layers[1]
    h = torch.randn(1, 4, model.config.hidden_size)
    pos = torch.arange(4)[None]
    pe = model.model.rotary_emb(h, pos)
    with lr.scaled(model, [1.0, 2.0, 1.0]):
        with pytest.raises(RuntimeError, match="decoder layer 1 received position_embeddings that no hooked rotary"):
            layer(h, position_embeddings=pe, attention_mask=None, position_ids=pos)
        layer0 = model.model.layers[0](h, position_embeddings=pe, attention_mask=None, position_ids=pos)  # factor 1
        assert layer0 is not None
    assert_untouched(model)


# -- unsupported models ---------------------------------------------------------------------------

@pytest.mark.parametrize("family,extra,words", [
    ("gpt2", {}, r"GPT2LMHeadModel: no decoder layer stack"),
    ("gptj", dict(rotary_dim=4), r"GPTJForCausalLM: no decoder layer stack"),
    ("recurrent_gemma", {}, r"decoder layer 0 \(RecurrentGemmaDecoderLayer\) does not receive `position_embeddings`"),
    ("cohere", {}, r"CohereRotaryEmbedding computes cos/sin differently"),
])
def test_unsupported_models_are_refused_with_the_reason(family, extra, words):
    m = tiny(family, **extra)
    with pytest.raises(TypeError, match=words):
        lr.apply(m, [2.0] * m.config.num_hidden_layers)
    assert_untouched(m)


def test_not_a_transformers_model_is_refused():
    with pytest.raises(TypeError, match="Linear: no decoder layer stack"):
        lr.apply(torch.nn.Linear(2, 2), [2.0])
    stack = torch.nn.Module()
    stack.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"decoder layer 0 \(Linear\) does not receive `position_embeddings`"):
        lr.apply(stack, [2.0])


# -- factors files ----------------------------------------------------------------------------------

def test_factors_for_a_model_of_a_different_depth_are_refused(model, tmp_path):
    p = tmp_path / "f.json"
    lr.save_factors(p, [1.0, 2.0, 3.0, 4.0], note="from a 4-layer model")
    with pytest.raises(ValueError, match=r"factors are for a 4-layer model, this model has 3 layers"):
        lr.load_factors(p, model=model)
    with pytest.raises(ValueError, match=r"factors are for a 4-layer model, this model has 30 layers"):
        lr.load_factors(p, num_layers=30)
    assert lr.load_factors(p, num_layers=4) == [1.0, 2.0, 3.0, 4.0]
    assert_untouched(model)


@pytest.mark.parametrize("text,words", [
    ("", "not valid JSON"),
    ("{\"format\": \"layer_rope.factors/1\", \"factors\": [1.0, 2.", "not valid JSON.*truncated"),
    ("{'format': 'layer_rope.factors/1'}", "not valid JSON"),  # Python, not JSON
    ("[1.0, 2.0, 3.0]", "not a layer_rope factors file"),
    ("{\"factors\": [1.0, 2.0, 3.0]}", "not a layer_rope factors file"),
    ("{\"format\": \"something/2\", \"factors\": [1.0, 2.0, 3.0]}", "not a layer_rope factors file"),
    ("{\"format\": \"layer_rope.factors/1\", \"num_layers\": 3}", "not a layer_rope factors file"),
    ("{\"format\": \"layer_rope.factors/1\", \"num_layers\": 4, \"factors\": [1.0, 2.0, 3.0]}",
     "got 3 factors for a model with 4"),
    ("{\"format\": \"layer_rope.factors/1\", \"factors\": [1.0, NaN, 3.0]}", "factor 1 is not finite"),
    ("{\"format\": \"layer_rope.factors/1\", \"factors\": [1.0, -2.0, 3.0]}", "factor 1 must be positive"),
    ("{\"format\": \"layer_rope.factors/1\", \"factors\": [1.0, \"2\", 3.0]}", "factor 1 is not a real number"),
    ("{\"format\": \"layer_rope.factors/1\", \"factors\": \"1 2 3\"}", "factors must be a sequence"),
])
def test_malformed_factors_files_are_refused(tmp_path, text, words):
    p = tmp_path / "f.json"
    p.write_text(text)
    with pytest.raises((ValueError, TypeError), match=words):
        lr.load_factors(p, num_layers=3)


def test_truncated_file_from_save_factors_is_refused(tmp_path):
    p = tmp_path / "f.json"
    lr.save_factors(p, [1.0, 1.5, 2.25])
    full = p.read_text()
    assert json.loads(full)["factors"] == [1.0, 1.5, 2.25]
    for cut in (1, len(full) // 2, len(full) - 3):
        p.write_text(full[:cut])
        with pytest.raises(ValueError, match="not valid JSON.*truncated"):
            lr.load_factors(p)


def test_save_factors_refuses_bad_factors_and_writes_nothing(tmp_path):
    p = tmp_path / "f.json"
    with pytest.raises(ValueError, match="factor 1 is not finite"):
        lr.save_factors(p, [1.0, math.inf])
    assert not p.exists() and not list(tmp_path.iterdir())


# -- control points -------------------------------------------------------------------------------

CURVE_FUNCS = [lr.layer_factors, lr.linear_factors, lr.step_factors]


@pytest.mark.parametrize("curve", CURVE_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("points,words", [
    ([[0.0, 1.0], [0.7, 2.0], [0.4, 3.0], [1.0, 1.0]], r"x \(layer depth\) must be non-decreasing"),
    ([[0.0, 1.0], [1.5, 2.0], [1.0, 1.0]], r"x \(layer depth\) must be non-decreasing"),  # x above 1
    ([[0.0, 1.0], [-0.5, 2.0], [1.0, 1.0]], r"x \(layer depth\) must be non-decreasing"),  # x below 0
    ([[0.2, 1.0], [0.5, 2.0], [1.0, 1.0]], "x must start at 0 and end at 1, got 0.2 and 1.0"),
    ([[0.0, 1.0], [0.5, 2.0], [0.9, 1.0]], "x must start at 0 and end at 1, got 0.0 and 0.9"),
    ([[-0.1, 1.0], [1.2, 1.0]], "x must start at 0 and end at 1"),
    ([[0.0, 1.0], [0.5, math.nan], [1.0, 1.0]], "control points must be finite"),
    ([[0.0, 1.0], [math.nan, 2.0], [1.0, 1.0]], "control points must be finite"),
    ([1.0, math.inf, 2.0], "control points must be finite"),
    ([[0.0, 1.0]], "need at least two"),
    ([], "need at least one control point"),
    ([[0.0, 1.0, 2.0], [1.0, 1.0, 2.0]], r"shape \(n,\) or \(n, 2\)"),
])
def test_bad_control_points_are_refused(curve, points, words):
    with pytest.raises(ValueError, match=words):
        curve(points, 8)


@pytest.mark.parametrize("n", [0, -3, 2.5, "8"])
def test_bad_layer_count_is_refused(n):
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        lr.layer_factors([1.0, 2.0], n)


@pytest.mark.parametrize("t", [-0.1, 1.0001, math.nan, [0.5, 2.0]])
def test_bezier_parameter_out_of_range_is_refused(t):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        lr.bezier([1.0, 2.0, 3.0], t)


def test_control_values_that_give_non_positive_factors_are_refused_by_apply(model):
    """Control y <= 0 is refused by the curve functions already; a non-positive list by apply."""
    for curve in (lr.layer_factors, lr.linear_factors, lr.step_factors):
        with pytest.raises(ValueError, match="control point factors must be positive"):
            curve([[0.0, 1.0], [0.5, -4.0], [1.0, 1.0]], L)
    with pytest.raises(ValueError, match="factor 1 must be positive"):
        lr.apply(model, [1.0, -0.5] + [1.0] * (L - 2))
    assert_untouched(model)
