"""
Slow, obviously-correct NumPy reference for layer_rope: the tests hold the torch code to it.

Everything here is written the way the papers state it, with loops and complex numbers where that is
clearest, not the way it is fast:
- RoPE (RoFormer, arXiv:2104.09864): pair i of a d-dim vector, (x_i, x_{i+d/2}) in Hugging Face's
  "rotate half" layout, is the complex number z_i = x_i + j x_{i+d/2}; position m multiplies it by
  exp(j m theta_i), theta_i = base^(-2i/d). Layer-specific scaling divides m by a factor s.
- The relative-position property: <R_m q, R_n k> depends on m - n only.
- The long-term decay bound (RoFormer section 3.4.3).
- Bezier curves by de Casteljau's algorithm (repeated linear interpolation), a different algorithm
  from the Bernstein form in layer_rope.py, so the two check each other.
"""

import numpy as np


def inv_freq(dim, base=10000.0):
    # theta_i = base^(-2i/d), i = 0 .. d/2-1  -> [d/2]
    return np.array([base ** (-2.0 * i / dim) for i in range(dim // 2)])


def rotate(x, m, base=10000.0, factor=1.0):
    # x: [d] at position m -> [d], rotated pair by pair by the angle (m / factor) * theta_i
    d = len(x)
    assert d % 2 == 0, "rotary dim must be even"
    theta = inv_freq(d, base)
    out = np.empty(d)
    for i in range(d // 2):
        z = complex(x[i], x[i + d // 2]) * np.exp(1j * (m / factor) * theta[i])
        out[i], out[i + d // 2] = z.real, z.imag
    return out


def score(q, k, m, n, base=10000.0, factor=1.0):
    # attention logit (unscaled) between query q at position m and key k at position n -> scalar
    return float(rotate(q, m, base, factor) @ rotate(k, n, base, factor))


def relative_score(q, k, r, base=10000.0, factor=1.0):
    # the same logit written through the relative distance r = m - n alone:
    # Re sum_i conj(z_k,i) z_q,i exp(j r theta_i / s)   -> scalar
    d = len(q)
    theta = inv_freq(d, base)
    zq = q[: d // 2] + 1j * q[d // 2:]
    zk = k[: d // 2] + 1j * k[d // 2:]
    return float(sum((zq[i] * np.conj(zk[i]) * np.exp(1j * (r / factor) * theta[i])).real for i in range(d // 2)))


def decay_bound(dim, base=10000.0, factor=1.0, max_distance=4096):
    # (1/(d/2)) sum_{j=1}^{d/2} |S_j(r)|,  S_j(r) = sum_{k<j} exp(j r theta_k / s)   -> [max_distance]
    theta = inv_freq(dim, base) / factor
    out = np.zeros(max_distance)
    for r in range(max_distance):
        S, total = 0j, 0.0
        for t in theta:  # S runs over the partial sums S_1 .. S_{d/2}
            S += np.exp(1j * r * t)
            total += abs(S)
        out[r] = total / len(theta)
    return out


def de_casteljau(points, t):
    # points: [n+1] or [n+1, d], t: scalar in [0, 1] -> scalar or [d]
    P = [np.asarray(p, dtype=float) for p in points]
    while len(P) > 1:
        P = [(1 - t) * a + t * b for a, b in zip(P[:-1], P[1:])]
    return P[0]
