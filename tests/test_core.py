"""Core: RoPE math and Bezier factors against the NumPy reference and SciPy, the patch against transformers."""

import json

import numpy as np
import pytest
import torch
from scipy.interpolate import BPoly

import harness
import layer_rope as lr
import reference_numpy as ref
from conftest import tiny_llama


# -- RoPE math against the reference ------------------------------------------------------------

@pytest.mark.parametrize("base,factor", [(10000.0, 1.0), (10000.0, 2.5), (100000.0, 4.0)])
def test_rotation_matches_reference(base, factor):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16))
    positions = np.array([0, 1, 7, 300, 4095])
    got = lr.rope_rotate(torch.tensor(x), torch.tensor(positions), base, factor).numpy()
    want = np.stack([ref.rotate(x[i], positions[i], base, factor) for i in range(5)])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # float32 (what models run) stays within float32 rounding of the angle m * theta
    got32 = lr.rope_rotate(torch.tensor(x, dtype=torch.float32), torch.tensor(positions), base, factor).numpy()
    np.testing.assert_allclose(got32, want, atol=2e-3 * positions.max() / 4095 + 1e-5, rtol=0)


def test_reference_relative_position_property():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    for m, n in [(5, 2), (105, 102), (1003, 1000)]:
        assert ref.score(q, k, m, n) == pytest.approx(ref.relative_score(q, k, m - n), abs=1e-9)
    assert ref.score(q, k, 10, 3, factor=2.0) == pytest.approx(ref.score(q, k, 5, 1.5), abs=1e-9)
    assert ref.score(q, k, 9, 0) != pytest.approx(ref.score(q, k, 8, 0), abs=1e-3)  # and it does depend on m-n


def test_torch_rotation_is_relative():
    q, k = torch.randn(2, 1, 32, dtype=torch.float64).unbind(0)
    def s(m, n):
        return (lr.rope_rotate(q, torch.tensor([m])) * lr.rope_rotate(k, torch.tensor([n]))).sum()
    assert torch.allclose(s(17, 4), s(1013, 1000), atol=1e-9)


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_decay_matches_reference(factor):
    got = lr.rope_decay(32, 10000.0, factor, max_distance=600).numpy()
    want = ref.decay_bound(32, 10000.0, factor, max_distance=600)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert got[0] == pytest.approx((32 // 2 + 1) / 2)  # r = 0: |S_j| = j, mean over j = 1..d/2


def test_decay_is_stretched_by_factor():
    d1 = lr.rope_decay(64, 10000.0, 1.0, max_distance=4000)
    d4 = lr.rope_decay(64, 10000.0, 4.0, max_distance=4000)
    torch.testing.assert_close(d4[::4], d1[:1000], atol=1e-9, rtol=0)  # decay_s(r) = decay_1(r / s)


# -- Bezier factors ------------------------------------------------------------------------------

def test_bezier_matches_scipy_bpoly_and_de_casteljau():
    rng = np.random.default_rng(2)
    t = np.linspace(0, 1, 37)
    for n in (1, 2, 3, 5):
        P = rng.uniform(1, 3, size=(n + 1, 2))
        want = BPoly(P[:, None, :], [0, 1])(t)  # coefficients (degree+1, intervals, d) in the Bernstein basis
        np.testing.assert_allclose(lr.bezier(P, t), want, atol=1e-12)
        np.testing.assert_allclose(lr.bezier(P[:, 0], t), [ref.de_casteljau(P[:, 0], ti) for ti in t], atol=1e-12)
    assert lr.bezier([1.0, 2.0, 5.0], 0.0) == 1.0 and lr.bezier([1.0, 2.0, 5.0], 1.0) == 5.0


def test_layer_factors_1d_equals_2d_with_even_x():
    y = [1.0, 1.8, 1.2, 2.0]
    P2 = np.stack([np.linspace(0, 1, 4), y], axis=1)
    np.testing.assert_allclose(lr.layer_factors(y, 30), lr.layer_factors(P2, 30), atol=1e-12)
    assert len(lr.layer_factors(y, 30)) == 30


def test_layer_factors_2d_solves_for_depth():
    P = np.array([[0.0, 1.0], [0.1, 2.0], [0.9, 1.0], [1.0, 1.5]])
    L = 30
    f = lr.layer_factors(P, L)
    t = lr.solve_bezier_x(P[:, 0], np.linspace(0, 1, L))
    np.testing.assert_allclose(lr.bezier(P[:, 0], t), np.linspace(0, 1, L), atol=1e-9)
    np.testing.assert_allclose(f, lr.bezier(P[:, 1], t), atol=1e-12)
    assert f[0] == 1.0 and f[-1] == 1.5
    assert lr.layer_factors([[0, 1.0], [0.3, 1.0], [0.6, 1.0], [1, 1.0]], L) == [1.0] * L  # exact, not 0.999..


def test_linear_and_step_alternatives():
    P = [[0.0, 1.0], [0.5, 2.0], [1.0, 1.0]]
    np.testing.assert_allclose(lr.linear_factors(P, 5), [1.0, 1.5, 2.0, 1.5, 1.0])
    np.testing.assert_allclose(lr.step_factors(P, 5), [1.0, 1.0, 2.0, 2.0, 1.0])
    assert set(lr.CURVES) == {"bezier", "linear", "step"}


def test_control_point_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        lr.layer_factors([[0, 1], [0.7, 2], [0.3, 1], [1, 1]], 10)
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        lr.layer_factors([[0.1, 1], [1, 2]], 10)
    with pytest.raises(ValueError, match="finite"):
        lr.layer_factors([1.0, float("nan")], 10)
    with pytest.raises(ValueError, match="factors must be positive"):
        lr.linear_factors([[0, 1.0], [1, 0.0]], 10)


# -- The patch against transformers -------------------------------------------------------------

@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 101, (2, 48))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_ones_and_remove_are_bitwise(ids, attn):
    model = tiny_llama(attn_implementation=attn)
    base = logits(model, ids)
    with lr.scaled(model, [1.0] * 4):
        assert torch.equal(logits(model, ids), base)
    with lr.scaled(model, [1.0, 2.0, 3.0, 1.5]):
        assert not torch.allclose(logits(model, ids), base, atol=1e-3)
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("s", [2.0, 3.7])
def test_uniform_factor_equals_hf_linear(ids, s):
    model = tiny_llama()
    pi = tiny_llama(rope_parameters={"rope_type": "linear", "factor": s, "rope_theta": 10000.0})
    pi.load_state_dict(model.state_dict())
    with lr.scaled(model, [s] * 4):
        torch.testing.assert_close(logits(model, ids), logits(pi, ids), atol=1e-5, rtol=0)


def test_pi_model_composes_with_layer_factors(ids):
    f, s = 2.0, 1.5
    pi = tiny_llama(rope_parameters={"rope_type": "linear", "factor": f, "rope_theta": 10000.0})
    pi_fs = tiny_llama(rope_parameters={"rope_type": "linear", "factor": f * s, "rope_theta": 10000.0})
    pi_fs.load_state_dict(pi.state_dict())
    base = logits(pi, ids)
    with lr.scaled(pi, [1.0] * 4):
        assert torch.equal(logits(pi, ids), base)
    with lr.scaled(pi, [s] * 4):
        torch.testing.assert_close(logits(pi, ids), logits(pi_fs, ids), atol=1e-5, rtol=0)


def test_dynamic_ntk_model_all_ones_and_composition():
    # 96 tokens > max_position_embeddings=64, so the dynamic update really changes inv_freq
    ids = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(3))
    dyn = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    plain = tiny_llama()
    assert not torch.allclose(logits(dyn, ids), logits(plain, ids), atol=1e-3)
    base = logits(dyn, ids)
    with lr.scaled(dyn, [1.0] * 4):
        assert torch.equal(logits(dyn, ids), base)
    # per-layer factors use the dynamically updated inv_freq: layer l sees positions m / s_l
    factors = [1.0, 2.0, 1.0, 3.0]
    with lr.scaled(dyn, factors):
        got = logits(dyn, ids)
    rot = dyn.model.rotary_emb
    assert not torch.equal(rot.inv_freq, rot.original_inv_freq)  # NTK-updated for 96 tokens
    assert not torch.allclose(got, base, atol=1e-3)


def test_cached_decoding_equals_full_forward(ids):
    model = tiny_llama()
    with lr.scaled(model, [1.0, 2.0, 1.5, 3.0]):
        full = logits(model, ids)
        with torch.no_grad():
            past = model(ids[:, :40], use_cache=True).past_key_values
            step = model(ids[:, 40:], past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 40:], atol=1e-5, rtol=0)


def test_generate_with_cache_matches_greedy_full_forward():
    model = tiny_llama()
    prompt = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(4))
    with lr.scaled(model, [2.0, 1.0, 3.0, 1.0]):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        seq = prompt
        for _ in range(6):  # greedy by hand, one full forward per token, no cache
            seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_distinct_factors_computed_once(ids, monkeypatch):
    """cos/sin once per pass per distinct factor; nothing is reused from an earlier pass."""
    model = tiny_llama(num_layers=6)
    calls = []
    with lr.scaled(model, [2.0, 2.0, 1.0, 3.0, 2.0, 3.0]):
        real = lr.rope_cos_sin
        monkeypatch.setattr(lr, "rope_cos_sin", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
        logits(model, ids)
        assert sorted(calls) == [2.0, 3.0]  # six layers, two distinct factors != 1
        logits(model, ids)
        assert sorted(calls) == [2.0, 2.0, 3.0, 3.0]  # again on the next pass


def test_handle_set_factors_and_refuse_double_patch(ids):
    model = tiny_llama()
    h = lr.apply(model, [2.0] * 4)
    with pytest.raises(RuntimeError, match="already patched"):
        lr.apply(model, [1.0] * 4)
    a = logits(model, ids)
    h.set_factors([1.0] * 4)
    assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))
    h.set_factors([2.0] * 4)
    assert torch.equal(logits(model, ids), a)
    h.remove()
    lr.apply(model, [1.0] * 4).remove()  # patchable again after remove


def test_factor_validation():
    model = tiny_llama()
    with pytest.raises(ValueError, match="3 factors for a model with 4 decoder layers"):
        lr.apply(model, [1.0] * 3)
    for bad, msg in [(float("nan"), "not finite"), (float("inf"), "not finite"), (0.0, "positive"), (-1.0, "positive")]:
        with pytest.raises(ValueError, match=msg):
            lr.apply(model, [1.0, bad, 1.0, 1.0])
    with pytest.raises(TypeError, match="not a real number"):
        lr.apply(model, [1.0, "2", 1.0, 1.0])
    assert getattr(model, "_layer_rope_handle", None) is None  # a refused apply leaves no hooks behind


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    factors = [1.0, 1.25, 1.7000000000000002, 2.0]
    path = tmp_path / "f.json"
    lr.save_factors(path, factors, control_points=[[0, 1], [1, 2]])
    assert lr.load_factors(path, model=model) == factors
    got, doc = lr.load_factors(path, with_metadata=True)
    assert doc["control_points"] == [[0, 1], [1, 2]] and doc["num_layers"] == 4
    with pytest.raises(ValueError, match="4-layer model, this model has 6 layers"):
        lr.load_factors(path, model=tiny_llama(num_layers=6))
    path.write_text(path.read_text()[:30])
    with pytest.raises(ValueError, match="truncated"):
        lr.load_factors(path)
    path.write_text(json.dumps({"factors": [1.0]}))
    with pytest.raises(ValueError, match="not a layer_rope factors file"):
        lr.load_factors(path)


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="decoder layer stack"):
        lr.apply(gpt2, [1.0, 1.0])


# -- The real embedded model --------------------------------------------------------------------

def test_embedded_model_uniform_factor_equals_reloaded_linear(smollm2):
    model, tok = smollm2
    s = 2.0
    pi, _ = harness.load_model(rope_parameters={"rope_type": "linear", "factor": s,
                                           "rope_theta": model.config.rope_parameters["rope_theta"]})
    assert lr.num_layers(model) == 30
    ids = tok("Extract the value corresponding to the specified key. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        want = pi(ids).logits
        with lr.scaled(model, [s] * 30):
            got = model(ids).logits
        assert torch.equal(model(ids).logits, base)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base, atol=1e-2)
