"""
layer_rope: layer-specific RoPE scaling for long-context LLMs -- the method, in one file you can copy.

Each decoder layer l divides its rotary positions by its own factor s_l >= 1, which slows RoPE's
long-term decay where that helps and leaves sensitive layers alone. The L factors come from a cubic
Bezier curve over layer depth, whose few control points a genetic algorithm searches on any fitness
(the paper's: key-value retrieval, in kv_retrieval.py). Read top to bottom; the sections follow the paper:

  1. RoPE math   2. the patch   3. factors from control points   4. the compact GA
  5. the verdict: the search's best against no scaling on validation prompts

Imports only the standard library, numpy and torch: it patches transformers models without importing
transformers (tqdm draws the GA's progress bar when it is installed).

References:
1) Layer-Specific Scaling of Positional Encodings for Superior Long-Context Modeling,
   arXiv:2503.04355 (revised as "LPES", arXiv:2606.27705) -- the method implemented here.
2) RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv:2104.09864 -- RoPE, the
   relative-position property and the long-term decay bound (section 3.4.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import numbers
import os
from typing import Callable, Sequence

import numpy as np
import torch

FACTORS_FORMAT = "layer_rope.factors/1"
CONFIG_KEY = "layer_rope_factors"  # the factors' key in a model folder's config.json (save_pretrained)
GA_FORMAT = "layer_rope.ga-checkpoint/2"

# -----------------------------------------------------------------------------
# 1. RoPE math
#
# RoPE rotates each pair (x_i, x_{i+d/2}) of a query/key at position m by the angle m * theta_i,
# theta_i = base^(-2i/d) (the "rotate half" layout of Hugging Face). Dividing positions by s,
# m -> m/s, is the same as dividing every theta_i by s: Position Interpolation, and what layer_rope
# does per layer.


def rope_inv_freq(dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_i = base^(-2i/dim), i = 0 .. dim/2-1. In float32 it is transformers' default RoPE bit for bit."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even integer, got {dim}")
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=dtype) / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float = 1.0,
                 attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32):
    """cos and sin of the angles m * (theta_i / s), duplicated to the full rotary dim.

    positions (..., seq) -> cos, sin (..., seq, dim), computed in `dtype` (float32 as transformers does,
    float64 for reference checks), times attention_scaling. The factor divides the frequencies, exactly
    as transformers' `linear` rope type does, so a uniform factor reproduces that rope type bit for bit.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=dtype)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    angles = positions[..., None].to(dtype) * inv_freq  # (..., seq, dim/2)
    # cos/sin are elementwise: on the half dim, then duplicated, equals cos(cat(angles, angles)) bit for bit
    cos, sin = angles.cos(), angles.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, factor: float = 1.0):
    """x (..., seq, dim) rotated at positions / factor: x * cos + rotate_half(x) * sin.

    Computed in float32, or in float64 when x is float64.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, rope_inv_freq(x.shape[-1], base, dtype), factor, dtype=dtype)
    y = x.to(dtype)
    return (y * cos + rotate_half(y) * sin).to(x.dtype)


def rope_decay(dim: int, base: float = 10000.0, factor: float = 1.0, max_distance: int = 4096) -> torch.Tensor:
    """RoFormer's long-term decay bound against relative distance r = 0 .. max_distance-1.

    decay(r) = (1 / (d/2)) * sum_{j=1}^{d/2} |S_j(r)|,  S_j(r) = sum_{k<j} exp(i * r * theta_k / s).
    The attention logit of bounded q, k is at most a constant times this; it falls with r, and a factor
    s stretches it by s along the distance axis. Returns float64, shape (max_distance,).
    """
    theta = rope_inv_freq(dim, base, torch.float64) / factor
    angles = torch.arange(max_distance, dtype=torch.float64)[:, None] * theta  # (distance, d/2)
    partial_sums = torch.cumsum(torch.polar(torch.ones_like(angles), angles), dim=-1)  # S_1 .. S_{d/2}
    return partial_sums.abs().mean(dim=-1)


# -----------------------------------------------------------------------------
# 2. The patch for Hugging Face transformers 5.x models
#
# In transformers 5.x one rotary module per model computes (cos, sin) once per forward pass and every
# decoder layer receives them as `position_embeddings`. We leave transformers' code alone and add
# hooks: a forward hook on each rotary module notes its call (positions, dtype, layer type), and a
# pre-hook on each decoder layer replaces that layer's `position_embeddings` with RoPE at positions
# m / s_l (`scale_layer_positions`, the method in one function). cos/sin are made from the module's
# own inv_freq (after any dynamic update) and attention_scaling, so the patch composes with every
# rope_type (PI, Dynamic-NTK, YaRN, LongRoPE, llama3); a factor of 1.0 passes the module's tensors on.


def check_factors(factors, num_layers: int | None = None) -> list[float]:
    """factors as a list of floats, or an error naming what is wrong with them (count, type, value)."""
    if isinstance(factors, (np.ndarray, torch.Tensor)):
        factors = factors.tolist()
    if isinstance(factors, (str, bytes, dict)) or not isinstance(factors, Sequence):
        raise TypeError(f"factors must be a sequence of numbers, got {type(factors).__name__}")
    out = []
    for i, f in enumerate(factors):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(f"factor {i} is not a real number: {f!r}")
        if not math.isfinite(f):
            raise ValueError(f"factor {i} is not finite: {f}")
        if f <= 0:
            raise ValueError(f"factor {i} must be positive, got {f}")
        out.append(float(f))
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"got {len(out)} factors for a model with {num_layers} decoder layers")
    return out


def _decoder(model):
    """The decoder stack (model.get_decoder()) and its layers, or TypeError for models without one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer stack (`get_decoder().layers`) found; layer_rope "
                        "supports transformers 5.x decoders whose layers take `position_embeddings` from a "
                        "model-level rotary module")
    return decoder


def num_layers(model) -> int:
    """Number of decoder layers, i.e. of factors the model takes."""
    return len(_decoder(model).layers)


@dataclasses.dataclass
class _RotaryCall:
    """One call of a rotary module in the current forward pass, and the scaled cos/sin made from it."""

    rotary: torch.nn.Module
    output: tuple  # (cos, sin) as the module returned them; the layers receive this very object
    dtype: torch.dtype
    position_ids: torch.Tensor
    layer_type: str | None
    scaled: dict  # factor -> (cos, sin)


def _rotary_params(rotary, layer_type):
    """(inv_freq, attention_scaling) of a rotary module, per layer type for several-RoPE models."""
    prefix = f"{layer_type}_" if layer_type is not None else ""
    return getattr(rotary, f"{prefix}inv_freq"), getattr(rotary, f"{prefix}attention_scaling")


@dataclasses.dataclass
class LayerRopeHandle:
    """What `apply` returns. `set_factors` changes the factors in place; `remove()` undoes the patch."""

    model: torch.nn.Module
    factors: list[float]
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _calls: list = dataclasses.field(default_factory=list, repr=False)  # _RotaryCall of this forward pass
    _last_use: dict = dataclasses.field(default_factory=dict, repr=False)  # factor -> last layer using it

    def __post_init__(self):
        self.set_factors(self.factors)

    def set_factors(self, factors) -> None:
        self.factors = check_factors(factors, len(self.factors))
        self._last_use = {f: i for i, f in enumerate(self.factors)}
        self._calls.clear()

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

    def _forget_pass(self, *_):
        self._calls.clear()  # at the start and end of each pass: nothing outlives the pass that made it

    def _record_rotary_call(self, rotary, args, kwargs, output):
        call = inspect.signature(rotary.forward).bind(*args, **kwargs).arguments
        self._calls.append(_RotaryCall(rotary, output, call["x"].dtype, call["position_ids"],
                                       call.get("layer_type"), {}))


def scale_layer_positions(handle: LayerRopeHandle, layer_idx: int, layer, args, kwargs):
    """THE METHOD: decoder layer l receives RoPE at positions m / s_l instead of m.

    A pre-hook on each layer: finds the rotary call that produced this layer's `position_embeddings`
    (by tensor identity, which also tells the local and global RoPEs of Gemma 3 apart) and replaces them
    with cos/sin of the same module, positions divided by the layer's factor. Computed once per pass per
    distinct factor, and freed after the last layer that uses it, so long inputs do not pile them up.
    """
    factor = handle.factors[layer_idx]
    if factor == 1.0:
        return None
    pe = kwargs.get("position_embeddings")
    if pe is None:
        raise TypeError(f"decoder layer {layer_idx} was called without `position_embeddings`; "
                        "layer_rope needs a model whose rotary module feeds every layer")
    call = next((c for c in handle._calls if c.output[0] is pe[0]), None)
    if call is None:
        raise RuntimeError(f"decoder layer {layer_idx} received position_embeddings that no hooked rotary "
                           "module produced in this forward pass; layer_rope cannot scale them")
    if factor not in call.scaled:
        inv_freq, attention_scaling = _rotary_params(call.rotary, call.layer_type)
        cos, sin = rope_cos_sin(call.position_ids, inv_freq, factor, attention_scaling)  # m -> m / s_l
        call.scaled[factor] = (cos.to(call.dtype), sin.to(call.dtype))
    scaled_pe = call.scaled[factor]
    if handle._last_use[factor] == layer_idx:
        del call.scaled[factor]
    return args, dict(kwargs, position_embeddings=scaled_pe)


def _check_rotary(rotary) -> None:
    """Refuse a rotary module whose cos/sin the standard formula does not reproduce bit for bit."""
    params = inspect.signature(rotary.forward).parameters
    if "x" not in params or "position_ids" not in params:
        raise TypeError(f"{type(rotary).__name__}.forward does not take (x, position_ids); unsupported rotary module")
    layer_types = sorted(rotary.rope_type) if isinstance(getattr(rotary, "rope_type", None), dict) else [None]
    raw_forward = inspect.unwrap(type(rotary).forward)  # without dynamic_rope_update: the probe touches no state
    x = torch.zeros(1, 1, device=_rotary_params(rotary, layer_types[0])[0].device)
    pos = torch.arange(7, device=x.device)[None] * 97
    for lt in layer_types:
        with torch.no_grad():
            theirs = raw_forward(rotary, x, pos) if lt is None else raw_forward(rotary, x, pos, lt)
            inv_freq, attention_scaling = _rotary_params(rotary, lt)
            ours = rope_cos_sin(pos, inv_freq, 1.0, attention_scaling)
        if not (isinstance(theirs, tuple) and len(theirs) == 2 and all(map(torch.equal, theirs, ours))):
            raise TypeError(f"{type(rotary).__name__} computes cos/sin differently from the standard RoPE formula "
                            "(positions * inv_freq, duplicated, times attention_scaling); layer_rope cannot "
                            "scale it exactly")


def apply(model, factors=None) -> LayerRopeHandle:
    """Patch `model` so that decoder layer l divides its rotary positions by factors[l]. Returns a handle.
    Without `factors`, the ones `save_pretrained` put in the model's config (`model.config.layer_rope_factors`).

    Refuses, leaving the model untouched: models whose layers do not take `position_embeddings` from a
    model-level rotary module (TypeError), and a model already patched (RuntimeError): remove that
    handle first, or change its factors with `handle.set_factors`.
    """
    if getattr(model, "_layer_rope_handle", None) is not None:
        raise RuntimeError("model is already patched by layer_rope; call handle.remove() before applying new "
                           "factors, or use handle.set_factors(...)")
    decoder = _decoder(model)
    layers = decoder.layers
    if factors is None:
        factors = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if factors is None:
            raise ValueError(f"no factors given and the model's config has no `{CONFIG_KEY}`: pass factors, or load "
                             "a folder written by layer_rope.save_pretrained")
    factors = check_factors(factors, len(layers))
    for i, layer in enumerate(layers):
        if "position_embeddings" not in inspect.signature(layer.forward).parameters:
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) does not receive `position_embeddings`; "
                            "layer_rope supports transformers 5.x models with one model-level rotary module")
    rotaries = [m for m in decoder.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise TypeError(f"{type(model).__name__}: no rotary embedding module found")
    inside_layers = {id(m) for layer in layers for m in layer.modules()}
    for rotary in rotaries:
        if id(rotary) in inside_layers:
            raise TypeError(f"{type(rotary).__name__} lives inside a decoder layer; layer_rope supports only "
                            "model-level rotary modules (transformers 5.x)")
        _check_rotary(rotary)

    handle = LayerRopeHandle(model, factors)
    hooks = [decoder.register_forward_pre_hook(handle._forget_pass),
             decoder.register_forward_hook(handle._forget_pass)]
    hooks += [r.register_forward_hook(handle._record_rotary_call, with_kwargs=True) for r in rotaries]
    hooks += [layer.register_forward_pre_hook(functools.partial(scale_layer_positions, handle, i), with_kwargs=True)
              for i, layer in enumerate(layers)]
    handle._hooks.extend(hooks)
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


def save_factors(path, factors, **metadata) -> None:
    """Write factors (one per decoder layer) and any JSON-able metadata to `path`, atomically."""
    factors = check_factors(factors)
    write_json(path, {"format": FACTORS_FORMAT, "num_layers": len(factors), "factors": factors, **metadata}, indent=1)


def save_pretrained(model, folder, factors, tokenizer=None, **kwargs) -> None:
    """Write `model` (and `tokenizer`) to `folder` as `model.save_pretrained` does, with the factors in its
    config.json under "layer_rope_factors": one folder to ship. `from_pretrained(folder)` then `apply(model)`
    restores the scaled model; the layer_rope vLLM plugin serves the folder with the same factors.
    The model's own config is left as it was."""
    factors = check_factors(factors, num_layers(model))
    config, missing = model.config, object()
    before = getattr(config, CONFIG_KEY, missing)
    setattr(config, CONFIG_KEY, factors)
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        if before is missing:
            delattr(config, CONFIG_KEY)
        else:
            setattr(config, CONFIG_KEY, before)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_factors(path, num_layers: int | None = None, model=None, with_metadata: bool = False):
    """Factors written by `save_factors`, checked against `num_layers` (or `model`'s depth). A file whose
    `verdict` (from a validated search) is no scaling gives all-ones factors, with a warning that says why."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); is the file truncated?") from None
    if not isinstance(doc, dict) or doc.get("format") != FACTORS_FORMAT or "factors" not in doc:
        raise ValueError(f"{path}: not a layer_rope factors file (expected \"format\": \"{FACTORS_FORMAT}\")")
    factors = check_factors(doc["factors"], doc.get("num_layers"))
    expected = len(_decoder(model).layers) if model is not None else num_layers
    if expected is not None and len(factors) != expected:
        raise ValueError(f"{path}: factors are for a {len(factors)}-layer model, this model has {expected} layers")
    verdict = doc.get("verdict")
    if isinstance(verdict, dict) and verdict.get("scaled") is False:  # a search that found nothing better
        import warnings

        factors = [1.0] * len(factors)
        warnings.warn(f"{path}: the search's verdict is no scaling, so these are all-ones factors ({verdict.get('line')}); "
                      "the GA's best is kept under 'ga_best'", stacklevel=2)
    return (factors, doc) if with_metadata else factors


# -----------------------------------------------------------------------------
# 3. Layer factors from a few control points
#
# Searching L factors directly costs M^L (M values per layer). The paper draws a cubic Bezier curve over
# relative layer depth instead: C control points, each a (depth, factor) pair on a grid, give about
# (M*L)^C candidates. Linear interpolation and a step function through the same points are the
# paper's ablations.


def bezier(points, t):
    """Bezier curve of degree n in Bernstein form: B(t) = sum_i C(n,i) t^i (1-t)^(n-i) P_i.

    points: (n+1,) or (n+1, d); t: scalar or array in [0, 1]. Returns shape t.shape or t.shape + (d,).
    """
    P = np.asarray(points, dtype=np.float64)
    if P.ndim not in (1, 2) or len(P) == 0:
        raise ValueError(f"points must have shape (n+1,) or (n+1, d), got {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError("points must be finite")
    t = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.any((t < 0) | (t > 1)):
        raise ValueError("t must lie in [0, 1]")
    n = len(P) - 1
    i = np.arange(n + 1)
    binom = np.array([math.comb(n, k) for k in i], dtype=np.float64)
    basis = binom * t[..., None] ** i * (1 - t[..., None]) ** (n - i)  # (..., n+1): b_{i,n}(t)
    return basis @ P


def _control_points(points) -> np.ndarray:
    """Checked control points: 1-D factor values, or (x, y) rows with x rising from 0 to 1 and y > 0."""
    P = np.asarray(points, dtype=np.float64)
    if not (P.ndim == 1 or (P.ndim == 2 and P.shape[1] == 2)):
        raise ValueError(f"control points must have shape (n,) or (n, 2), got {P.shape}")
    if len(P) < P.ndim:
        raise ValueError("need at least one control point" if P.ndim == 1 else "need at least two (x, y) pairs")
    if not np.all(np.isfinite(P)):
        raise ValueError("control points must be finite")
    if P.ndim == 2:
        x = P[:, 0]
        if np.any(np.diff(x) < 0):
            raise ValueError(f"control point x (layer depth) must be non-decreasing, got {x.tolist()}")
        if x[0] != 0.0 or x[-1] != 1.0:
            raise ValueError(f"control point x must start at 0 and end at 1, got {x[0]} and {x[-1]}")
    y = P if P.ndim == 1 else P[:, 1]
    if np.any(y <= 0):
        raise ValueError(f"control point factors must be positive, got {y.tolist()}")
    return P


def _layer_depths(num_layers: int) -> np.ndarray:
    """Relative depth l / (L-1) of each layer; a single layer sits at depth 0."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    return np.linspace(0.0, 1.0, int(num_layers))


def solve_bezier_x(x_points: np.ndarray, u: np.ndarray) -> np.ndarray:
    """t* with x(t*) = u for a Bezier x(t) whose control x are non-decreasing (so x(t) is too).

    Bisection: 60 halvings of [0, 1] leave |t - t*| < 1e-18.
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
    2-D points are (x, y), x the relative depth: layer l gets y(t*) where x(t*) = l/(L-1).
    """
    P = _control_points(points)
    u = _layer_depths(num_layers)
    if P.ndim == 1:
        y, t = P, u
    else:
        y, t = P[:, 1], solve_bezier_x(P[:, 0], u)
        t[u == 0.0], t[u == 1.0] = 0.0, 1.0  # the curve passes exactly through its end points
    # The curve lies in the convex hull of its control points: clipping to [min y, max y] removes only
    # rounding, so equal control values (all 1.0, say) give exactly that value.
    return np.clip(bezier(y, t), y.min(), y.max()).tolist()


def _xy(points) -> tuple[np.ndarray, np.ndarray]:
    P = _control_points(points)
    return (np.linspace(0.0, 1.0, len(P)), P) if P.ndim == 1 else (P[:, 0], P[:, 1])


def linear_factors(points, num_layers: int) -> list[float]:
    """Piecewise-linear interpolation through the control points (1-D: evenly spaced in depth)."""
    x, y = _xy(points)
    return np.interp(_layer_depths(num_layers), x, y).tolist()


def step_factors(points, num_layers: int) -> list[float]:
    """Step function: a layer at depth u takes the y of the last control point with x <= u."""
    x, y = _xy(points)
    return y[np.searchsorted(x, _layer_depths(num_layers), side="right") - 1].tolist()


CURVES: dict[str, Callable[..., list[float]]] = {"bezier": layer_factors, "linear": linear_factors,
                                                 "step": step_factors}


# -----------------------------------------------------------------------------
# 4. The compact GA
#
# An individual is a tuple of grid indices: the C-2 inner control points' layer positions (the first
# point sits at layer 0, the last at layer L-1), then the C factor values as indices into the grid
# factor_min, factor_min + step, ..., factor_max. Tuples are hashable (the evaluation cache) and JSON-
# friendly (the checkpoint). Offspring come from tournament selection, uniform crossover of whole control
# points and +-k grid-step mutation; inner x's are re-sorted, so every individual is a valid curve. A
# child already evaluated is mutated again (a few tries) so the budget goes to new points; the elite
# survive unchanged. With `layers` set there is no curve: the individual is one factor index per listed
# layer (every other layer stays at 1.0), the direct search of a few layers, such as a hybrid model's
# global-attention layers.
#
# The JSON checkpoint, written atomically after every evaluation, holds the generation's population, the
# RNG state after breeding it and every evaluation so far. A resumed search re-evaluates nothing and
# continues from the saved RNG state: it ends exactly where an uninterrupted one with the same seed does.


@dataclasses.dataclass(frozen=True)
class GAConfig:
    """Search space and GA settings."""

    num_layers: int
    num_points: int = 4  # C control points; 4 = cubic Bezier
    factor_min: float = 1.0
    factor_max: float = 2.0
    factor_step: float = 0.05
    curve: str = "bezier"  # a key of CURVES
    freeze: tuple = ()  # layers held at 1.0 whatever the curve says
    layers: tuple = ()  # if set: no curve, one gene per listed layer, every other layer at 1.0
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
        minimum = dict(num_layers=2, num_points=2, population=2, generations=1, elite=0, tournament=1,
                       mutation_steps=1, retries=0, seed=0)
        for name, lowest in minimum.items():
            check_int(f"GAConfig.{name}", getattr(self, name), lowest)
        for name in ("factor_min", "factor_max", "factor_step", "crossover_rate", "mutation_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TypeError(f"GAConfig.{name} must be a finite real number, got {v!r}")
        if not 0 < self.factor_min <= self.factor_max or self.factor_step <= 0:
            raise ValueError(f"need 0 < factor_min <= factor_max and factor_step > 0, got {self.factor_min}, "
                             f"{self.factor_max}, {self.factor_step}")
        steps = (self.factor_max - self.factor_min) / self.factor_step
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(f"factor range {self.factor_min}..{self.factor_max} is not a whole number of steps "
                             f"of {self.factor_step}")
        if self.curve not in CURVES:
            raise ValueError(f"curve must be one of {sorted(CURVES)}, got {self.curve!r}")
        if self.elite >= self.population or not (0 <= self.crossover_rate <= 1 and 0 <= self.mutation_rate <= 1):
            raise ValueError("need elite < population and crossover_rate, mutation_rate in [0, 1]")
        for name in ("freeze", "layers"):
            object.__setattr__(self, name, _layer_indices(name, getattr(self, name), self.num_layers))
        if self.layers and self.freeze:
            raise ValueError("layers and freeze exclude each other: with layers, every layer not listed is at 1.0")

    @property
    def grid(self) -> list[float]:
        """The factor values an individual can take."""
        steps = int(round((self.factor_max - self.factor_min) / self.factor_step))
        return [round(self.factor_min + i * self.factor_step, 10) for i in range(steps + 1)]

    @property
    def genes(self) -> int:
        return len(self.layers) if self.layers else 2 * self.num_points - 2

    @property
    def inner(self) -> int:
        """Leading genes that are layer positions (the inner control points' x); the rest index the grid."""
        return 0 if self.layers else self.num_points - 2

    def to_json(self) -> dict:
        doc = dict(dataclasses.asdict(self), freeze=list(self.freeze), layers=list(self.layers))
        if not self.layers:  # written only when set, so checkpoints from before the option still resume
            del doc["layers"]
        return doc


def _layer_indices(name: str, layers, num_layers: int) -> tuple:
    """layers as a sorted tuple of distinct layer indices, or an error naming the bad one."""
    for layer in layers:
        if check_int(f"{name} layer", layer) not in range(num_layers):
            raise ValueError(f"{name}: {layer!r} is not a layer index in 0 .. {num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} lists a layer twice: {list(layers)}")
    return tuple(sorted(int(layer) for layer in layers))


def check_individual(ind, config: GAConfig) -> tuple:
    """ind as a tuple of ints, or an error naming what makes it invalid for `config`."""
    if isinstance(ind, (str, bytes)) or not isinstance(ind, Sequence):
        raise TypeError(f"an individual is a sequence of ints, got {type(ind).__name__}")
    if len(ind) != config.genes:
        what = (f"one factor index per layer of {list(config.layers)}" if config.layers else
                f"{config.inner} inner layer positions + {config.num_points} factor indices")
        raise ValueError(f"individual has {len(ind)} genes, expected {config.genes} ({what})")
    for gene in ind:
        if isinstance(gene, bool) or not isinstance(gene, numbers.Integral):
            raise TypeError(f"gene {gene!r} is not an integer")
    xs, ys = list(ind[:config.inner]), list(ind[config.inner:])
    if any(not 0 <= x < config.num_layers for x in xs) or xs != sorted(xs):
        raise ValueError(f"inner layer positions must be sorted and in 0 .. {config.num_layers - 1}, got {xs}")
    if any(not 0 <= y < len(config.grid) for y in ys):
        raise ValueError(f"factor indices must lie in 0 .. {len(config.grid) - 1}, got {ys}")
    return tuple(int(g) for g in ind)


def control_points(ind, config: GAConfig) -> list[list[float]]:
    """(x, y) control points of an individual: x the relative depth l/(L-1), y the factor (with `layers`:
    one point per listed layer)."""
    ind = check_individual(ind, config)
    last, inner = config.num_layers - 1, config.inner
    xs = config.layers or [0, *ind[:inner], last]
    return [[x / last, config.grid[y]] for x, y in zip(xs, ind[inner:])]


def individual_factors(ind, config: GAConfig) -> list[float]:
    """Per-layer factors of an individual: its curve, with the frozen layers at 1.0 (with `layers`: the
    listed layers' factors, every other layer at 1.0)."""
    if config.layers:
        factors = [1.0] * config.num_layers
        for layer, y in zip(config.layers, check_individual(ind, config)):
            factors[layer] = config.grid[y]
        return factors
    factors = CURVES[config.curve](control_points(ind, config), config.num_layers)
    for layer in config.freeze:
        factors[layer] = 1.0
    return [round(v, 12) for v in factors]  # rounded so that libm noise cannot change factors or fitness


def random_individual(rng: np.random.Generator, config: GAConfig) -> tuple:
    xs = sorted(int(v) for v in rng.integers(0, config.num_layers, config.inner))
    return tuple(xs + [int(v) for v in rng.integers(0, len(config.grid), config.genes - config.inner)])


def mutate(ind: tuple, rng: np.random.Generator, config: GAConfig, force: bool = False) -> tuple:
    """Move each gene with probability mutation_rate (at least one if force) by +-1..k grid steps,
    reflected back into range; then re-sort the inner layer positions."""
    inner, genes = config.inner, list(ind)
    hit = rng.random(len(genes)) < config.mutation_rate
    if force and not hit.any():
        hit[rng.integers(len(genes))] = True
    for i in np.flatnonzero(hit):
        top = (config.num_layers if i < inner else len(config.grid)) - 1
        if top == 0:
            continue
        v = genes[i] + int(rng.integers(1, config.mutation_steps + 1)) * (1 if rng.random() < 0.5 else -1)
        while not 0 <= v <= top:  # reflect at the ends of the grid
            v = -v if v < 0 else 2 * top - v
        genes[i] = v
    genes[:inner] = sorted(genes[:inner])
    return tuple(genes)


def crossover(a: tuple, b: tuple, rng: np.random.Generator, config: GAConfig) -> tuple:
    """Uniform crossover of whole control points: point i (its x, if inner, and its y) from a or b
    (with `layers`: each layer's factor from a or b)."""
    inner = config.inner
    points = config.genes - inner
    take_b = rng.random(points) < 0.5
    xs = [(b if take_b[i] else a)[i - 1] for i in range(1, points - 1)] if inner else []
    ys = [(b if take_b[i] else a)[inner + i] for i in range(points)]
    return tuple(sorted(xs) + ys)


def _ranked(pop: list, cache: dict) -> list:
    """Population best first; ties broken by the individual itself, so the order is deterministic."""
    return sorted(set(pop), key=lambda ind: (-cache[ind], ind))


def _breed(pop: list, cache: dict, rng: np.random.Generator, config: GAConfig) -> list:
    """The next population: the elite first, then tournament-selected, crossed and mutated children."""
    ranked = _ranked(pop, cache)
    nxt = ranked[:config.elite]
    seen = set(nxt)
    while len(nxt) < config.population:
        a, b = (min((ranked[int(i)] for i in rng.integers(0, len(ranked), config.tournament)),
                    key=lambda ind: (-cache[ind], ind)) for _ in range(2))
        child = crossover(a, b, rng, config) if rng.random() < config.crossover_rate else a
        child = mutate(child, rng, config)
        for _ in range(config.retries):
            if child not in cache and child not in seen:
                break
            child = mutate(child, rng, config, force=True)
        nxt.append(child)
        seen.add(child)
    return nxt


@dataclasses.dataclass
class GAResult:
    best: tuple
    fitness: float
    factors: list
    control_points: list
    history: list  # per generation: generation, best, best_fitness, mean_fitness, evals_total
    evaluations: list  # (individual, fitness, generation, prompts scored or None), each individual once
    stopped_early: bool = False  # max_evaluations ended the search before its last generation

    def to_json(self) -> dict:
        return {"best": list(self.best), "fitness": self.fitness, "factors": self.factors,
                "control_points": self.control_points, "history": self.history,
                "evaluations": [[list(e[0]), *e[1:]] for e in self.evaluations],
                "stopped_early": self.stopped_early}


def _load_checkpoint(path: str, config: GAConfig, tag) -> dict:
    """A checkpoint's contents, refusing (ValueError) a corrupt file or one written for another search."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({e}); delete it to start afresh") from None
    need = ("format", "config", "tag", "generation", "population", "rng", "evaluations", "history")
    if not isinstance(doc, dict) or doc.get("format") != GA_FORMAT or any(k not in doc for k in need):
        raise ValueError(f"checkpoint {path} is not a {GA_FORMAT} file (missing or wrong fields)")
    ours = config.to_json()
    if doc["config"] != ours:
        diff = sorted(k for k in set(doc["config"]) | set(ours) if doc["config"].get(k) != ours.get(k))
        raise ValueError(f"checkpoint {path} was written with different GA settings ({', '.join(diff)}); "
                         "use the same settings to resume, or another checkpoint path")
    if doc["tag"] != tag:
        raise ValueError(f"checkpoint {path} was written for a different fitness ({doc['tag']!r}, now {tag!r})")
    try:
        doc["population"] = [check_individual(i, config) for i in doc["population"]]
        doc["evaluations"] = [(check_individual(e[0], config), float(e[1]), int(e[2]), e[3])
                              for e in doc["evaluations"]]
        np.random.Generator(np.random.PCG64()).bit_generator.state = doc["rng"]
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"checkpoint {path} holds invalid data: {e}") from None
    return doc


def _evaluate(fitness: Callable, jobs: list, mapper):
    """(job index, result) pairs. An executor (anything with .submit) is drained as jobs complete, so a
    worker that dies loses none of the others' finished results: they are yielded first, then the error
    is raised. Any other map-like is consumed in order."""
    if not hasattr(mapper, "submit"):
        yield from enumerate(mapper(fitness, jobs))
        return
    from concurrent.futures import as_completed

    futures = {mapper.submit(fitness, job): i for i, job in enumerate(jobs)}
    error = None
    for fut in as_completed(futures):
        if fut.exception() is not None:
            error = error or fut.exception()
        else:
            yield futures[fut], fut.result()
    if error is not None:
        raise error


def _start(config: GAConfig, checkpoint: str | None, tag) -> tuple:
    """(generation, population, rng, evaluations, history): from the checkpoint if there is one, else a
    first population of distinct random individuals (fewer distinct ones if the space is tiny)."""
    if checkpoint is not None and os.path.exists(checkpoint):
        doc = _load_checkpoint(checkpoint, config, tag)
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = doc["rng"]
        return doc["generation"], doc["population"], rng, doc["evaluations"], doc["history"]
    rng, pop = np.random.default_rng(config.seed), []
    for _ in range(100 * config.population):
        ind = random_individual(rng, config)
        if ind not in pop:
            pop.append(ind)
        if len(pop) == config.population:
            break
    return 0, pop + [pop[i % len(pop)] for i in range(config.population - len(pop))], rng, [], []


def genetic_search(fitness: Callable, config: GAConfig, mapper=map, checkpoint: str | None = None, tag=None,
                   progress: bool = True, race: bool = False, max_evaluations: int | None = None) -> GAResult:
    """Maximise fitness(factors) over the individuals of `config` (Bezier curves, or its `layers`' factors).

    fitness: one list of per-layer factors -> a number, or anything float() accepts (a KVFitness, whose
        prompt count `n` is recorded). Higher is better.
    mapper: how a generation is evaluated: a map-like mapper(fn, factor_lists) giving results in order
        (built-in map; a Ray or multiprocessing pool's .map), or an executor with .submit (results are
        recorded as they complete). Both need a picklable fitness when processes are involved.
    checkpoint: JSON path written atomically after every evaluation; if it exists the search resumes from
        it, refusing a corrupt file or one written with other settings or another `tag`.
    tag: any JSON value naming the fitness (e.g. its data settings); stored and checked on resume.
    race: from generation 1 on, call fitness(factors, bar=b) with b the weakest elite's fitness; a
        fitness may then stop early and return any value below b (e.g. kv_fitness's upper bound).
    max_evaluations: stop once this many individuals are evaluated in all, a checkpoint's included, and
        return the best so far with `stopped_early` set. The checkpoint stays resumable: run again without
        the limit (or with a larger one) and the search goes on exactly as if it had never stopped.
    """
    if not isinstance(config, GAConfig):
        raise TypeError(f"config must be a GAConfig, got {type(config).__name__}")
    if max_evaluations is not None:
        max_evaluations = check_int("max_evaluations", max_evaluations, 1)
    gen, pop, rng, evaluations, history = _start(config, checkpoint, tag)
    cache = {e[0]: e[1] for e in evaluations}

    def save():
        if checkpoint is not None:
            write_json(checkpoint, {"format": GA_FORMAT, "config": config.to_json(), "tag": tag, "generation": gen,
                                    "population": [list(i) for i in pop], "rng": rng.bit_generator.state,
                                    "evaluations": [[list(e[0]), *e[1:]] for e in evaluations], "history": history})

    save()
    progress_bar = _progress_bar(config.generations, gen, "GA generations", progress)
    while True:
        todo = list(dict.fromkeys(i for i in pop if i not in cache))
        stopped = max_evaluations is not None and len(cache) + len(todo) > max_evaluations
        if stopped:
            todo = todo[:max(0, max_evaluations - len(cache))]
        fn = fitness
        if race and gen > 0 and config.elite > 0:
            fn = functools.partial(fitness, bar=min(cache[i] for i in pop[:config.elite]))
        for j, result in _evaluate(fn, [individual_factors(i, config) for i in todo], mapper):
            value = float(result)
            if not math.isfinite(value):
                raise ValueError(f"fitness returned {value} for individual {todo[j]}")
            cache[todo[j]] = value
            evaluations.append((todo[j], value, gen, getattr(result, "n", None)))
            save()  # after every evaluation: a kill loses at most the ones in flight
        # this generation's evaluations in population order, however they completed
        evaluations.sort(key=lambda e: (e[2], pop.index(e[0]) if e[2] == gen else 0))
        if stopped:  # a generation cut short has no history entry: resuming completes and records it
            break
        best = _ranked(pop, cache)[0]
        if len(history) == gen:  # not yet recorded (a resumed, finished search has it already)
            history.append({"generation": gen, "best": list(best), "best_fitness": cache[best],
                            "mean_fitness": float(np.mean([cache[i] for i in pop])), "evals_total": len(cache)})
            progress_bar.update(1)
        progress_bar.set_postfix(best=f"{cache[best]:.4f}", evals=len(cache))
        if gen + 1 >= config.generations:
            break
        pop = _breed(pop, cache, rng, config)
        gen += 1
        save()
    save()
    progress_bar.close()
    best = min(cache, key=lambda ind: (-cache[ind], ind))  # the best ever evaluated (elitism keeps it anyway)
    return GAResult(best, cache[best], individual_factors(best, config), control_points(best, config), history,
                    evaluations, stopped)


def synthetic_fitness(factors) -> float:
    """A cheap smooth stand-in for the KV fitness (tests, benchmarks): -mean (f_l - target_l)^2 with the
    target a bump of height 1.8 at 40% depth, 1.0 at both ends; maximum 0."""
    f = np.asarray(check_factors(factors), dtype=np.float64)
    u = np.linspace(0, 1, len(f))
    return float(-np.mean((f - (1.0 + 0.8 * np.exp(-((u - 0.4) / 0.2) ** 2))) ** 2))

# -----------------------------------------------------------------------------
# 5. The verdict: is the search's best better than no scaling on prompts it never selected on?
#
# The GA's best is the maximum of many noisy scores, so its search-set fitness is optimistic (the winner's
# curse): picked by that alone, it is noise as often as signal. The verdict re-scores a few candidates (the
# GA's distinct finalists, the best uniform factor) and the baseline (no scaling) on validation prompts and
# keeps a candidate only if it beats the baseline there by a paired test, Holm-corrected over the
# candidates; among those it takes the best validation fitness. If none qualifies, the verdict is the
# baseline. Paired: all are scored on the same prompts, so prompt difficulty cancels. Tests: exact McNemar
# on right/wrong per prompt, or a paired bootstrap of any per-prompt value (e.g. the gold log-prob).

TESTS = ("mcnemar", "bootstrap")


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p: 2 P(X <= min(only_a, only_b)), X ~ Binomial(only_a + only_b, 1/2), at most 1.
    Only the prompts where exactly one side is right count."""
    d, k = only_a + only_b, min(only_a, only_b)
    return 1.0 if d == 0 else min(1.0, 2 * sum(math.comb(d, i) for i in range(k + 1)) / 2 ** d)


def paired_test(a, b, test: str = "mcnemar", resamples: int = 10000, seed: int = 0) -> dict:
    """a against b, one value per prompt on the same prompts: the mean difference a - b, its 95% paired
    bootstrap interval, and p: exact McNemar (values must be 0/1), or the bootstrap's two-sided p,
    2 min(#{mean* <= 0}, #{mean* >= 0}) + 1) / (resamples + 1)."""
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"a paired test needs two equally long, non-empty 1-d score lists, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite")
    if test == "mcnemar" and not np.isin(np.concatenate([a, b]), (0.0, 1.0)).all():
        raise ValueError("McNemar's test needs right/wrong (0/1) scores; use test='bootstrap' for other values")
    diff = a - b
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    out = {"difference": float(diff.mean()), "ci95": [float(q) for q in np.quantile(means, [0.025, 0.975])],
           "n": len(diff)}
    if test == "mcnemar":
        out.update(only_a=int(np.sum(diff > 0)), only_b=int(np.sum(diff < 0)))
        out["p"] = mcnemar_p(out["only_a"], out["only_b"])
    else:
        out["p"] = min(1.0, 2 * (min(np.sum(means <= 0), np.sum(means >= 0)) + 1) / (resamples + 1))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the i-th smallest p times (m - i), running maximum, at most 1.
    Rejecting where adjusted p <= alpha keeps the chance of any false rejection <= alpha."""
    order, out, running = np.argsort(pvalues, kind="stable"), [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, float(pvalues[i]) * (len(pvalues) - rank)))
        out[i] = running
    return out


def detectable_difference(n: int, discordant: float | None = None, sd: float | None = None, alpha: float = 0.05,
                          power: float = 0.8, comparisons: int = 1) -> float:
    """The smallest true mean difference a two-sided paired test on n prompts detects with `power` at level
    alpha / comparisons (Holm's strictest step); inf if none can be.

    Right/wrong scores (McNemar; Connor 1987's normal approximation): with psi the fraction of prompts
    where the two differ, n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, solved for d <= psi.
    Per-prompt values (bootstrap, normal approximation): d = (z_a + z_b) sd / sqrt(n)."""
    from statistics import NormalDist

    n = check_int("n", n, 1)
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / comparisons / 2), NormalDist().inv_cdf(power)
    if (discordant is None) == (sd is None):
        raise ValueError("give exactly one of discordant (McNemar) or sd (bootstrap)")
    if sd is not None:
        return (z_a + z_b) * float(sd) / math.sqrt(n)
    psi = float(discordant)
    if not 0 <= psi <= 1:
        raise ValueError(f"discordant is a fraction of prompts, got {discordant}")
    gap = lambda d: (z_a * math.sqrt(psi) + z_b * math.sqrt(max(psi - d * d, 0.0))) / math.sqrt(n) - d
    if psi == 0 or gap(psi) > 0:
        return math.inf
    lo, hi = 0.0, psi  # gap falls from > 0 at d = 0 to <= 0 at d = psi
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if gap((lo + hi) / 2) > 0 else (lo, (lo + hi) / 2)
    return hi


@dataclasses.dataclass
class Verdict:
    """What `validated_choice` decided, with every candidate's validation scores and paired statistics."""

    chosen: str  # a candidate's name, or the baseline's: no candidate beat it
    factors: list
    baseline: str
    test: str
    alpha: float
    n: int
    candidates: dict  # name -> fitness, difference, ci95, p, p_holm, beats_baseline (and only_a / only_b)
    detectable: float  # the smallest difference these n prompts detect (80% power, alpha / candidates)
    noise: dict  # what `detectable` assumed: the median discordant fraction (McNemar) or sd of differences
    shape_vs_uniform: dict | None = None  # the chosen curve against the best uniform candidate, same test

    @property
    def scaled(self) -> bool:
        return self.chosen != self.baseline

    def line(self) -> str:
        """The verdict in one plain line: what was chosen (or, for the baseline, the best candidate it kept
        out), its validation difference from the baseline with interval and Holm p, and what n can detect."""
        others = [k for k in self.candidates if k != self.baseline]
        if not others:
            return f"verdict: {self.baseline} (no candidates)"
        name = self.chosen if self.scaled else max(others, key=lambda k: self.candidates[k]["fitness"])
        c = self.candidates[name]
        if math.isfinite(self.detectable):
            detect = f"detectable difference {self.detectable:.3f}"
        elif "discordant" in self.noise:
            detect = (f"no gain is detectable: the candidates differ from {self.baseline} on "
                      f"{self.noise['discordant']:.0%} of the prompts, too few at this n")
        else:
            detect = "no gain is detectable at this n"
        stats = (f"{c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] vs {self.baseline} on "
                 f"{self.n} validation prompts, Holm p = {c['p_holm']:.3g}; {detect}")
        if not self.scaled:
            return f"verdict: {self.baseline} -- no candidate beat it (best: {name}, {stats})"
        if self.shape_vs_uniform is not None:
            s = self.shape_vs_uniform
            stats += (f"; vs {s['uniform']}: {s['difference']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}], "
                      f"p = {s['p']:.3g}, {'better' if s['beats_uniform'] else 'not better'}")
        return f"verdict: {name} ({stats})"

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["detectable"] = self.detectable if math.isfinite(self.detectable) else None
        return dict(doc, scaled=self.scaled, line=self.line())


def validated_choice(validate: Callable, candidates: dict, baseline: str = "no scaling", test: str = "mcnemar",
                     alpha: float = 0.05, uniform: str | None = None, seed: int = 0) -> Verdict:
    """The verdict over `candidates` ({name: factors}, the baseline among them) on validation prompts.

    validate: factors -> (fitness, per-prompt scores) on the same validation prompts every call, called once
        per candidate in the candidates' order; fitness ranks the qualifying candidates, the scores are
        paired (0/1 right/wrong for McNemar).
    A candidate qualifies iff its mean score beats the baseline's and its Holm-adjusted p (over all
    candidates but the baseline) is <= alpha. `uniform`: the name of the best uniform factor among the
    candidates; when a layer-specific candidate is chosen, it is tested against that one the same way.
    """
    if baseline not in candidates:
        raise ValueError(f"the baseline {baseline!r} must be one of the candidates {list(candidates)}")
    if uniform is not None and uniform not in candidates:
        raise ValueError(f"uniform {uniform!r} is not one of the candidates {list(candidates)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    scored = {}
    for name, factors in candidates.items():
        fitness, scores = validate(check_factors(factors))
        scored[name] = (float(fitness), np.asarray(scores, dtype=np.float64))
    base = scored[baseline][1]
    others = [k for k in candidates if k != baseline]
    stats = {k: paired_test(scored[k][1], base, test, seed=seed) for k in others}
    adjusted = holm([stats[k]["p"] for k in others])
    table = {baseline: {"fitness": scored[baseline][0], "mean": float(base.mean())}}
    for k, p_holm in zip(others, adjusted):
        table[k] = {"fitness": scored[k][0], "mean": float(scored[k][1].mean()), **stats[k], "p_holm": p_holm,
                    "beats_baseline": bool(stats[k]["difference"] > 0 and p_holm <= alpha)}
    winners = [k for k in others if table[k]["beats_baseline"]]
    chosen = max(winners, key=lambda k: table[k]["fitness"]) if winners else baseline
    if test == "mcnemar":  # the typical noise: the median fraction of prompts where a candidate and the baseline differ
        spread = dict(discordant=float(np.median([(stats[k]["only_a"] + stats[k]["only_b"]) / len(base)
                                                  for k in others])) if others else 0.0)
    else:
        spread = dict(sd=float(np.median([np.std(scored[k][1] - base, ddof=1) if len(base) > 1 else 0.0
                                           for k in others])) if others else 0.0)
    detectable = detectable_difference(len(base), alpha=alpha, comparisons=max(1, len(others)), **spread)
    shape = None
    if uniform is not None and chosen not in (baseline, uniform):
        s = paired_test(scored[chosen][1], scored[uniform][1], test, seed=seed)
        shape = dict(s, uniform=uniform, beats_uniform=bool(s["difference"] > 0 and s["p"] <= alpha))
    return Verdict(chosen, list(candidates[chosen]), baseline, test, alpha, len(base), table, detectable, spread, shape)


# -----------------------------------------------------------------------------
# 6. Small helpers: checked integers, atomic JSON, the progress bar

def check_int(name: str, value, minimum: int | None = None) -> int:
    """value as an int, or TypeError/ValueError naming `name` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)



def write_json(path, doc, indent: int | None = None) -> None:
    """Write-then-rename (fsynced): a reader, or a SIGKILL, never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _NoBar:
    """What _progress_bar returns without tqdm (or with progress off): a bar that draws nothing."""

    def update(self, n=1): pass

    def set_postfix(self, **kw): pass

    def close(self): pass


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm's bar where tqdm is installed and progress is on; else one that draws nothing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled)
