"""Property-based tests (hypothesis): Bezier layer factors and the RoPE rotation, against reference_numpy.

Bezier: end points, convex hull, agreement with de Casteljau (a different algorithm), linear precision
(x control points evenly spaced make x(t) = t, so the 2-D curve reduces to the 1-D one), monotonicity.
RoPE: norm preservation, the relative-position property, agreement with the loop-and-complex-numbers
reference, "factor s at position m == factor 1 at position m/s", and the decay bound stretched by s.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layer_rope as lr
import reference_numpy as ref

# per test, not a global profile: other test files keep their own hypothesis settings
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
factor_values = st.floats(0.25, 16.0, allow_nan=False, allow_infinity=False)
unit = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
control_1d = st.lists(values, min_size=1, max_size=7)
control_2d = st.lists(st.tuples(values, values), min_size=1, max_size=7)
layers = st.integers(1, 48)
factors_1d = st.lists(factor_values, min_size=1, max_size=7)  # layer_factors takes positive factors only


def scale(P):
    return 1.0 + float(np.max(np.abs(P)))


# -- Bezier curves --------------------------------------------------------------------------------

@fast
@given(control_1d | control_2d)
def test_bezier_end_points_are_the_first_and_last_control_points(points):
    P = np.asarray(points)
    assert np.array_equal(lr.bezier(P, 0.0), P[0])
    assert np.array_equal(lr.bezier(P, 1.0), P[-1])


@fast
@given(control_1d | control_2d, unit)
def test_bezier_agrees_with_de_casteljau(points, t):
    P = np.asarray(points)
    np.testing.assert_allclose(lr.bezier(P, t), ref.de_casteljau(points, t), rtol=0, atol=1e-12 * scale(P))


@fast
@given(control_2d, st.lists(unit, min_size=1, max_size=9),
       st.lists(st.tuples(values, values), min_size=1, max_size=4))
def test_bezier_stays_in_the_convex_hull(points, ts, directions):
    """Point B is in the hull of P iff w.B <= max_i w.P_i for every direction w (axes and random ones)."""
    P = np.asarray(points)
    B = lr.bezier(P, np.asarray(ts))  # (len(ts), 2)
    W = np.vstack([np.eye(2), -np.eye(2), np.asarray(directions)])
    assert np.all(B @ W.T <= (P @ W.T).max(axis=0) + 1e-12 * scale(P) * (1 + np.abs(W).sum(1)))


@fast
@given(factors_1d, layers)
def test_layer_factors_1d_are_the_curve_at_even_depths(points, L):
    f = lr.layer_factors(points, L)
    assert len(f) == L and all(type(v) is float for v in f)
    assert f[0] == points[0]
    if L > 1:
        assert f[-1] == points[-1]
    want = [ref.de_casteljau(points, l / (L - 1) if L > 1 else 0.0) for l in range(L)]
    np.testing.assert_allclose(f, want, rtol=0, atol=1e-12 * scale(points))
    assert min(points) <= min(f) and max(f) <= max(points)  # convex hull, exactly (no rounding outside)


@fast
@given(factors_1d.filter(lambda p: len(p) >= 2), layers)
def test_layer_factors_2d_with_even_x_equal_1d(ys, L):
    """Linear precision: control x_i = i/n gives x(t) = t, so layer l sits at t = l/(L-1)."""
    xy = np.column_stack([np.linspace(0.0, 1.0, len(ys)), ys])
    f2 = lr.layer_factors(xy, L)
    assert f2[0] == ys[0] and (L == 1 or f2[-1] == ys[-1])
    np.testing.assert_allclose(f2, lr.layer_factors(ys, L), rtol=0, atol=1e-9 * scale(ys))
    assert min(ys) <= min(f2) and max(f2) <= max(ys)


@fast
@given(st.lists(unit, min_size=0, max_size=5), st.lists(factor_values, min_size=2, max_size=7), layers)
def test_layer_factors_2d_monotone_control_values_give_monotone_factors(inner_x, ys, L):
    """Any non-decreasing control x from 0 to 1, non-decreasing y: the factors never decrease with depth,
    start at y_0, end at y_n and stay in [min y, max y]."""
    n = len(ys)
    x = np.sort(np.concatenate([[0.0, 1.0], np.resize(np.asarray(inner_x + [0.5]), n - 2)]))
    y = np.sort(ys)
    f = lr.layer_factors(np.column_stack([x, y]), L)
    assert f[0] == y[0] and (L == 1 or f[-1] == y[-1])
    assert np.all(np.diff(f) >= -1e-9 * scale(y))
    assert y.min() <= min(f) and max(f) <= y.max()


@fast
@given(factors_1d, layers)
def test_linear_and_step_factors_hit_the_control_values(points, L):
    x = np.linspace(0.0, 1.0, len(points))
    lin, step = lr.linear_factors(points, L), lr.step_factors(points, L)
    assert len(lin) == len(step) == L
    assert lin[0] == step[0] == points[0]
    if L > 1:
        assert lin[-1] == step[-1] == points[-1]
    assert all(v in points for v in step)
    np.testing.assert_allclose(lin, np.interp(np.linspace(0, 1, L), x, points), rtol=0, atol=1e-12 * scale(points))


# -- RoPE rotation -----------------------------------------------------------------------------------

dims = st.sampled_from([2, 4, 8, 16, 64])
bases = st.sampled_from([10000.0, 100000.0, 500000.0])
positions = st.integers(0, 20000)


def vec(seed, d):
    return np.random.default_rng(seed).standard_normal(d)


def rot(x, m, base, s):
    """layer_rope's rotation of one float64 vector at position m."""
    return lr.rope_rotate(torch.tensor(x)[None], torch.tensor([m], dtype=torch.float64), base, s)[0].numpy()


@fast
@given(st.integers(0, 2**32 - 1), dims, positions, bases, factor_values)
def test_rotation_matches_reference_and_preserves_norm(seed, d, m, base, s):
    x = vec(seed, d)
    got = rot(x, m, base, s)
    np.testing.assert_allclose(got, ref.rotate(x, m, base, s), rtol=0, atol=1e-9 * (1 + m) / 1000 + 1e-12)
    assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    # float32 (what the patch feeds models) keeps the norm to float32 rounding too
    got32 = lr.rope_rotate(torch.tensor(x, dtype=torch.float32)[None], torch.tensor([m]), base, s)[0].double()
    assert got32.norm().item() == pytest.approx(np.linalg.norm(x), rel=1e-5)


@fast
@given(st.integers(0, 2**32 - 1), dims, positions, positions, st.integers(-5000, 5000), bases, factor_values)
def test_rotation_scores_depend_on_relative_position_only(seed, d, m, n, shift, base, s):
    q, k = vec(seed, d), vec(seed + 1, d)
    shift = max(shift, -min(m, n))  # keep positions >= 0
    score = rot(q, m, base, s) @ rot(k, n, base, s)
    shifted = rot(q, m + shift, base, s) @ rot(k, n + shift, base, s)
    tol = 1e-9 * np.linalg.norm(q) * np.linalg.norm(k) * (1 + max(m, n) + abs(shift)) / 1000 + 1e-12
    assert shifted == pytest.approx(score, abs=tol)
    assert ref.relative_score(q, k, m - n, base, s) == pytest.approx(score, abs=tol)


@fast
@given(st.integers(0, 2**32 - 1), dims, positions, bases, factor_values)
def test_factor_s_at_position_m_is_factor_1_at_position_m_over_s(seed, d, m, base, s):
    x = vec(seed, d)
    np.testing.assert_allclose(rot(x, m, base, s), rot(x, m / s, base, 1.0), rtol=0, atol=1e-9 * (1 + m) / 1000 + 1e-12)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([8, 16, 32]), bases, st.integers(1, 4), st.integers(8, 48))
def test_decay_bound_matches_reference_and_is_stretched_by_the_factor(d, base, s, R):
    ours = lr.rope_decay(d, base, float(s), R).numpy()
    np.testing.assert_allclose(ours, ref.decay_bound(d, base, float(s), R), rtol=1e-10, atol=1e-12)
    unscaled = lr.rope_decay(d, base, 1.0, R).numpy()
    stretched = lr.rope_decay(d, base, float(s), R * s).numpy()[::s]  # decay_s(s r) == decay_1(r)
    np.testing.assert_allclose(stretched, unscaled, rtol=1e-9, atol=1e-12)
    assert ours[0] == pytest.approx((d // 2 + 1) / 2)  # r = 0: |S_j| = j, mean over j = 1 .. d/2


@fast
@given(dims, bases, factor_values, st.lists(positions, min_size=1, max_size=6))
def test_patch_cos_sin_match_reference_angles(d, base, s, ms):
    """The float32 cos/sin the patch hands to layers are cos/sin of (m / s) theta_i to float32 rounding."""
    cos, sin = lr.rope_cos_sin(torch.tensor([ms]), lr.rope_inv_freq(d, base), s)
    assert cos.dtype == torch.float32 and cos.shape == (1, len(ms), d)
    theta = ref.inv_freq(d, base)
    ang = np.asarray(ms, dtype=np.float64)[:, None] / s * np.concatenate([theta, theta])[None]
    tol = 4e-7 * (1 + max(ms) / s) + 1e-6  # the float32 angle m * (theta / s) carries ~1 ulp of m theta / s
    np.testing.assert_allclose(cos[0].double().numpy(), np.cos(ang), rtol=0, atol=tol)
    np.testing.assert_allclose(sin[0].double().numpy(), np.sin(ang), rtol=0, atol=tol)
    assert math.isclose(float((cos ** 2 + sin ** 2).max()), 1.0, rel_tol=1e-6)
