"""Comparison baselines for layer_rope on transformers 5.x Llama-family models, through hooks only:

  1. Ms-PoE (Zhang et al. 2024, "Found in the Middle"): `apply_mspoe`, `mspoe` -- described here;
  2. positional hidden-state scaling (Yu et al. 2024, "Mitigate Position Bias in Large Language Models via
     Scaling a Single Dimension", arXiv:2406.02536): `hidden_scaling`, `find_position_channel` -- described
     in its section below.

Ms-PoE on Llama, Mistral, Qwen2, Qwen3, Gemma 3. Per attention *head*, not per layer: in every layer not in
`skip_layers`, queries and keys of the head at rank i use positions m / r_i, r_i = r_min + (r_max - r_min) * i / H,
i < H.

Ranks. "fixed": head h has rank h. "score": ranked once per prompt, at prefill, by position awareness, the share
of keys whose weight in the last query's attention row exceeds alpha times the row mean. More outliers (more
position-aware) -> lower rank -> smaller ratio, nearer the trained positions (the paper's intent). The public code
(VITA-Group/Ms-PoE, utils/modify_arch/*.py, `_calculate_outlier`) sorts by decreasing outlier share too, but its
`cos[head_order]` gives head h the ratio of rank head_order[h] (the inverse permutation); it scores q.k before
RoPE (score_rope=False here; default True: the model's own RoPE at the original positions), alpha 4 (llama.py)
or 3 (mspoe_models.py), and its fixed ("normal") order is rank H-1-h.

Grouped-query attention: q_m . k_n depends only on m - n when query and key share the ratio, and one key head
serves a group of query heads; so ratios go per KV head (H = number of KV heads; plain multi-head attention is
the paper exactly), a group's awareness being the mean of its query heads'. (The public code gives a group's
query heads ratios other than their key head's.) With one KV head (Gemma 3 270M: 4 query heads, 1 KV head) there
is one group: every head gets r_min, Ms-PoE is linear position interpolation by r_min in the patched layers, and
"score" is "fixed".

Mechanism: a forward hook on the model-level rotary module records each of its calls in the pass: position_ids
(so left-padded batches with explicit position_ids work) and the inv_freq and attention_scaling it used (per layer
type where one module holds several RoPEs, as Gemma 3's: sliding layers theta 1e4, global layers 1e6); a pre-hook
on each patched attention finds, by tensor identity, the call whose output it received, and swaps
position_embeddings for the identity (cos = 1, sin = 0: the model's apply_rotary_pos_emb returns q, k bit for bit);
hooks on the modules whose outputs the model rotates -- q_proj/k_proj, or q_norm/k_norm where a per-head norm sits
between projection and RoPE (Qwen3: on (B, T, H, D); Gemma 3: on (B, H, T, D)) -- rotate those outputs per KV group
at m / r_i with cos/sin of that call's inv_freq and attention_scaling in float32 (layer_rope.rope_cos_sin), cast
to the model dtype, x * cos + rotate_half(x) * sin in that dtype, as transformers does. Keys are cached rotated.
The ranks of a prefill (a pass with an empty or no cache) are kept for the later passes (decoding steps) of the
same generate call; scoring costs one more k_proj and a one-token q_proj per layer at prefill, and sees what the
layer attends to: q_norm/k_norm applied, keys within its sliding window. TypeError for a q_norm/k_norm that is not
per head (OLMo2's acts on the whole projection, before the reshape) or other extra attention modules, no
q_proj/k_proj, partial rotary, or a rotary module whose cos/sin (per layer type) the standard formula does not
give bit for bit.
"""

import contextlib
import dataclasses
import functools
import inspect
import math
import string

import numpy as np
import torch

import layer_rope as lr

ORDERS = ("score", "fixed")
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_NORMS = {"q_norm", "k_norm"}


def mspoe_ratios(n_heads: int, r_min: float = 1.2, r_max: float = 1.8) -> list[float]:
    """The ratio of each rank: r_i = r_min + (r_max - r_min) * i / n_heads, i = 0 .. n_heads-1."""
    return [r_min + (r_max - r_min) * i / n_heads for i in range(n_heads)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv: int, layout: str = "proj") -> torch.Tensor:
    """x * cos + rotate_half(x) * sin per KV group; cos/sin (B or 1, T, n_kv, D), one ratio per group. x as the
    hooked module returns it, by layout: "proj" (B, T, heads*D) from q_proj/k_proj; "bthd" (B, T, heads, D) from a
    per-head norm before the transpose (Qwen3); "bhtd" (B, heads, T, D) from one after it (Gemma 3). Query head j
    belongs to KV group j // (heads / n_kv), as transformers' repeat_kv has it."""
    if layout == "bhtd":  # (B, n_kv, G, T, D) against (B, n_kv, 1, T, D)
        y, c, s, dim = x.unflatten(1, (n_kv, -1)), cos.transpose(1, 2)[:, :, None], sin.transpose(1, 2)[:, :, None], 1
    else:  # (B, T, n_kv, G, D) against (B, T, n_kv, 1, D)
        y = x.unflatten(-1, (n_kv, -1, cos.shape[-1])) if layout == "proj" else x.unflatten(2, (n_kv, -1))
        c, s, dim = cos[:, :, :, None], sin[:, :, :, None], 2
    out = (y * c) + (lr.rotate_half(y) * s)
    return out.flatten(2) if layout == "proj" else out.flatten(dim, dim + 1)


@torch.no_grad()
def _score_order(attn, hidden, pe, mask, n_kv: int, alpha: float, rope: bool, norm: bool = False) -> torch.Tensor:
    """(B, n_kv) KV heads by decreasing awareness, per example. Query head h: |{j : w_hj > alpha / n}| / n over
    the n keys of the last real token's causal row w (float32), as the layer attends: within its sliding window if
    it has one, after q_norm/k_norm if `norm` (no logit soft-capping); a KV head: its query heads' mean, ranked by
    the integer count summed over the group (same order; ties stay exact, lower index first)."""
    B, T, _ = hidden.shape
    cos, sin = (t.expand(B, -1, -1) for t in pe)  # (B, T, D), the model's own RoPE at the original positions
    D, dev = cos.shape[-1], hidden.device
    if mask is not None and mask.dim() != 2:
        raise ValueError("order='score' needs a 2-D attention_mask (batch, keys) or none")
    valid = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask[:, -T:].to(dev).bool()
    ar, b = torch.arange(T, device=dev), torch.arange(B, device=dev)
    last = torch.where(valid, ar, -1).amax(-1).clamp(min=0)  # last real token (left or right padding)
    keys = valid & (ar <= last[:, None])  # causal row of that token, padding excluded
    window = getattr(attn, "sliding_window", getattr(getattr(attn, "config", None), "sliding_window", None))
    if window:  # transformers' sliding_window_overlay: key j is seen from query i when j > i - window
        keys &= ar > last[:, None] - window
    q = attn.q_proj(hidden[b, last][:, None]).view(B, n_kv, -1, D)  # only the last query row is needed
    k = attn.k_proj(hidden).view(B, T, n_kv, D)
    if norm:  # per-head RMSNorm over D (checked by _probe): the layout it runs on does not change its values
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope:  # as the model rotates them, in its dtype
        q = q * cos[b, last][:, None, None] + lr.rotate_half(q) * sin[b, last][:, None, None]
        k = k * cos[:, :, None] + lr.rotate_half(k) * sin[:, :, None]
    logits = torch.einsum("bhgd,bthd->bhgt", q.float(), k.float()) * getattr(attn, "scaling", D ** -0.5)
    w = logits.masked_fill(~keys[:, None, None], float("-inf")).softmax(-1)
    counts = (w > alpha / keys.sum(-1).clamp(min=1).view(B, 1, 1, 1)).sum(-1).sum(-1)  # (B, n_kv)
    return torch.argsort(counts, dim=-1, descending=True, stable=True)


@dataclasses.dataclass
class MsPoEHandle:
    """What `apply_mspoe` returns; `remove()` undoes the patch. ratios[i]: the ratio of rank i. head_order[layer]:
    (batch, n_kv_heads) LongTensor of the last prefill, [b, i] = the KV head (group) that got ratios[i] in example b."""

    model: torch.nn.Module
    ratios: list
    order: str
    alpha: float
    layers: list  # indices of the patched layers
    n_kv_heads: int
    score_rope: bool = True
    layout: str = "proj"  # where the hooks rotate, see _rotate: "proj" at q_proj/k_proj, else at q_norm/k_norm
    head_order: dict = dataclasses.field(default_factory=dict)
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _pass: dict = dataclasses.field(default_factory=dict, repr=False)  # this pass: its rotary calls, cos/sin
    _cur: dict = dataclasses.field(default_factory=dict, repr=False)  # layer -> its (cos, sin) while it runs

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._reset()
        if getattr(self.model, "_mspoe_handle", None) is self:
            del self.model._mspoe_handle

    # -- hooks --------------------------------------------------------------------------------
    def _reset(self, *_):
        self._pass, self._cur = {}, {}  # at the start and end of each pass: nothing outlives the pass that made it

    def _on_decoder(self, decoder, args, kwargs):
        self._reset()
        a = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
        a = {**a.get("kwargs", {}), **a}
        cache = a.get("cache") if a.get("cache") is not None else a.get("past_key_values")
        self._pass.update(prefill=cache is None or cache.get_seq_length() == 0, mask=a.get("attention_mask"))

    def _on_rotary(self, rotary, args, kwargs, out):
        """Records one rotary call: Gemma 3's module is called once per layer type, each with its own RoPE."""
        a = inspect.signature(rotary.forward).bind(*args, **kwargs).arguments
        inv_freq, scaling = lr._rotary_params(rotary, a.get("layer_type"))  # after any dynamic update
        self._pass.setdefault("ropes", []).append(dict(out=out, pos=a["position_ids"], dtype=a["x"].dtype,
                                                       inv_freq=inv_freq, scaling=scaling))

    def _cos_sin(self, rope: dict):
        """cos, sin (B or 1, T, n_kv, D): rank i's RoPE at m / ratios[i] with this rotary call's (layer type's)
        inv_freq and attention_scaling, once per pass and call; and the identity (cos = 1, sin = 0)."""
        if "cos" not in rope:
            by_r = {r: lr.rope_cos_sin(rope["pos"], rope["inv_freq"], r, rope["scaling"]) for r in set(self.ratios)}
            rope["cos"], rope["sin"] = (torch.stack([by_r[r][j] for r in self.ratios], dim=-2).to(rope["dtype"])
                                        for j in (0, 1))
            rope["identity"] = (torch.ones_like(rope["out"][0]), torch.zeros_like(rope["out"][1]))
        return rope["cos"], rope["sin"], rope["identity"]

    def _on_attn(self, i, attn, args, kwargs):
        p, pe = self._pass, kwargs.get("position_embeddings")
        rope = next((r for r in p.get("ropes", ()) if pe is not None and pe[0] is r["out"][0]), None)
        if rope is None:  # identity tells the layer types apart, as in layer_rope.scale_layer_positions
            raise RuntimeError(f"layer {i}: attention did not receive this pass's rotary output as position_embeddings "
                               "(another position patch, e.g. layer_rope, in the way?); Ms-PoE cannot rescale it")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, n_kv = hidden.shape[0], self.n_kv_heads
        if p["prefill"]:
            self.head_order[i] = (_score_order(attn, hidden, pe, p["mask"], n_kv, self.alpha, self.score_rope,
                                               self.layout != "proj")
                                  if self.order == "score" else torch.arange(n_kv, device=hidden.device).expand(B, -1))
        cos, sin, identity = self._cos_sin(rope)
        if self.order == "score":
            order = self.head_order.get(i)
            if order is None or order.shape[0] != B:
                raise RuntimeError(f"layer {i}: a pass with a filled cache but no prefill of the same batch before "
                                   "it; order='score' ranks the heads at prefill")
            rank = torch.argsort(order, dim=-1)  # rank of each KV head: the inverse permutation
            idx = rank[:, None, :, None].expand(B, cos.shape[1], -1, cos.shape[-1])
            cos, sin = cos.expand(B, -1, -1, -1).gather(2, idx), sin.expand(B, -1, -1, -1).gather(2, idx)
        self._cur[i] = (cos, sin)
        return args, dict(kwargs, position_embeddings=identity)

    def _done(self, i, *_) -> None:
        self._cur.pop(i, None)  # free this layer's cos/sin; returns None (non-None would replace the output)

    def _on_proj(self, i, proj, inp, out):
        cs = self._cur.get(i)  # None while _score_order calls the projection or norm
        return None if cs is None else _rotate(out, *cs, self.n_kv_heads, self.layout)


def _layer_types(decoder, rotary, n: int) -> list:
    """Each layer's key into a rotary module holding one RoPE per layer type (rope_type a dict, as Gemma 3's):
    config.layer_types; [None] * n for one RoPE."""
    if not isinstance(getattr(rotary, "rope_type", None), dict):
        return [None] * n
    types = list(getattr(getattr(decoder, "config", None), "layer_types", None) or ())
    if len(types) != n or not set(types) <= set(rotary.rope_type):
        raise TypeError(f"{type(rotary).__name__} holds one RoPE per layer type {sorted(rotary.rope_type)}, but the "
                        f"config's layer_types {types} do not give one of them to each of the {n} layers")
    return types


def _check_rotary(rotary, layer_types) -> None:
    """Refuse a rotary module whose cos/sin the standard formula (layer_rope.rope_cos_sin) does not give exactly,
    for each layer type in use (None: the module's one RoPE)."""
    for lt in sorted(set(layer_types), key=str):
        try:
            inv_freq, scaling = lr._rotary_params(rotary, lt)
            ok = isinstance(inv_freq, torch.Tensor)
            if ok:
                x, pos = torch.zeros(1, 1, device=inv_freq.device), torch.arange(7, device=inv_freq.device)[None] * 97
                with torch.no_grad():  # the undecorated forward: the probe must not touch dynamic-RoPE state
                    raw = inspect.unwrap(type(rotary).forward)
                    theirs = raw(rotary, x, pos) if lt is None else raw(rotary, x, pos, lt)
                    ours = lr.rope_cos_sin(pos, inv_freq, 1.0, scaling)
                ok = isinstance(theirs, tuple) and len(theirs) == 2 and all(map(torch.equal, theirs, ours))
        except (AttributeError, TypeError):  # no inv_freq/attention_scaling (of that layer type), other signature
            ok = False
        if not ok:
            raise TypeError(f"{type(rotary).__name__} is not a standard rotary module or computes cos/sin differently "
                            "from the standard RoPE formula" + (f" for layer type {lt!r}" if lt else "") +
                            "; Ms-PoE here cannot rescale it exactly")


def _check_attention(i, layer, inv_freq) -> tuple:
    """(attention module, query heads, KV heads) of layer i, or TypeError saying why the hooks cannot be exact.
    inv_freq: the RoPE of the layer's type. A q_norm/k_norm pair is left to _probe, which checks it is per head."""
    attn = getattr(layer, "self_attn", None)
    names = {n for n, _ in attn.named_children()} if attn is not None else set()
    if not {"q_proj", "k_proj"} <= names:
        raise TypeError(f"layer {i}: no self_attn with q_proj/k_proj; Ms-PoE supports Llama-family attention")
    extra = names - _ATTN_CHILDREN
    if extra and extra != _NORMS:
        raise TypeError(f"layer {i}: {type(attn).__name__} has {sorted(extra)} besides the projections (and a "
                        "q_norm/k_norm pair); hooks on q_proj/k_proj might rotate before them, so Ms-PoE cannot be "
                        "reproduced exactly")
    D = getattr(attn, "head_dim", 0)
    n_q, n_kv = (getattr(p, "out_features", 0) // max(D, 1) for p in (attn.q_proj, attn.k_proj))
    if "position_embeddings" not in inspect.signature(attn.forward).parameters or not (D and n_kv) or n_q % n_kv:
        raise TypeError(f"layer {i}: {type(attn).__name__} takes no position_embeddings or has no head_dim/heads")
    if 2 * inv_freq.numel() != D:
        raise TypeError(f"layer {i}: partial rotary ({2 * inv_freq.numel()} of {D} dims) is not supported")
    return attn, n_q, n_kv


def _probe(attn, inv_freq, attention_scaling, n_q: int, n_kv: int) -> str:
    """Where the hooks rotate (a _rotate layout), or TypeError. On random input of T = n_q + 2 tokens (more than
    any head count, so the shapes tell the layouts apart): with q_norm/k_norm their outputs must be per head,
    (1, T, heads, D) "bthd" (Qwen3) or (1, heads, T, D) "bhtd" (Gemma 3) -- not so, the norm acts on the whole
    projection (OLMo2) and no hook sits between it and the RoPE; then the hooks (identity position_embeddings, q/k
    rotated at those modules) at ratio 1 must give the attention's output: else it uses position_embeddings in some
    other way."""
    w, D, T = attn.q_proj.weight, attn.head_dim, n_q + 2
    x = torch.randn(1, T, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    pos = torch.arange(T, device=w.device)[None] * 13 + 5
    cos, sin = (t.to(w.dtype) for t in lr.rope_cos_sin(pos, inv_freq, 1.0, attention_scaling))
    norms = _NORMS <= {n for n, _ in attn.named_children()}
    mods = (attn.q_norm, attn.k_norm) if norms else (attn.q_proj, attn.k_proj)
    shapes = {}
    with torch.no_grad():
        hooks = [m.register_forward_hook(lambda _m, _i, o, j=j: shapes.__setitem__(j, tuple(o.shape)))
                 for j, m in enumerate(mods)]
        try:
            ref = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        finally:
            [h.remove() for h in hooks]
        layout = "proj"
        if norms:
            per_head = [{(1, T, n, D): "bthd", (1, n, T, D): "bhtd"}.get(shapes.get(j))
                        for j, n in enumerate((n_q, n_kv))]
            if per_head[0] is None or per_head[0] != per_head[1]:
                raise TypeError(f"{type(attn).__name__}: q_norm/k_norm output shapes {list(shapes.values())} are not "
                                "per head (e.g. OLMo2's q_norm acts on the whole projection, before the reshape); "
                                "hooks on q_proj/k_proj would rotate before them, so Ms-PoE cannot be reproduced "
                                "exactly")
            layout = per_head[0]
        c, s = cos[:, :, None], sin[:, :, None]  # (1, T, 1, D): every KV group at ratio 1
        hooks = [m.register_forward_hook(lambda _m, _i, o: _rotate(o, c, s, n_kv, layout)) for m in mods]
        try:
            ours = attn(hidden_states=x, position_embeddings=(cos * 0 + 1, sin * 0), attention_mask=None)[0]
        finally:
            [h.remove() for h in hooks]
    if not (ours - ref).abs().max() <= 1e-3 * ref.abs().max():
        raise TypeError(f"{type(attn).__name__} does not rotate {'q_norm/k_norm' if norms else 'q_proj/k_proj'} "
                        "outputs with position_embeddings in the standard way; Ms-PoE here cannot reproduce it")
    return layout


def apply_mspoe(model, r_min: float = 1.2, r_max: float = 1.8, order: str = "score", alpha: float = 3.0,
                skip_layers=(0, 1), score_rope: bool = True) -> MsPoEHandle:
    """Ms-PoE on `model`: outside skip_layers, the KV group at rank i rotates its queries and keys at positions m / r_i,
    r_i = r_min + (r_max - r_min) * i / H_kv; rank = head index ("fixed") or by decreasing outlier share
    |{j : w_j > alpha * mean(w)}| / n of the last query's row at prefill ("score"; see the module docstring).
    Returns a handle; handle.remove() restores the model bit for bit. ValueError: bad arguments; TypeError: a model
    the hooks cannot do exactly; RuntimeError: already patched."""
    for name, v in (("r_min", r_min), ("r_max", r_max), ("alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must be <= r_max ({r_max})")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if any(getattr(model, a, None) is not None
           for a in ("_mspoe_handle", "_layer_rope_handle", "_hidden_scaling_handle")):
        raise RuntimeError("model is already patched (Ms-PoE, layer_rope or hidden scaling); remove that handle first")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers, rotary = getattr(decoder, "layers", None), getattr(decoder, "rotary_emb", None)
    if not isinstance(layers, torch.nn.ModuleList) or not isinstance(rotary, torch.nn.Module):
        raise TypeError(f"{type(model).__name__}: no decoder stack with a model-level `rotary_emb`; Ms-PoE supports "
                        "transformers 5.x Llama-family models")
    skip = set(skip_layers)
    if not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < len(layers) for l in skip):
        raise ValueError(f"skip_layers must be layer indices in [0, {len(layers)}), got {skip_layers!r}")
    types = _layer_types(decoder, rotary, len(layers))
    _check_rotary(rotary, types)
    params = {lt: lr._rotary_params(rotary, lt) for lt in set(types)}  # (inv_freq, attention_scaling)
    infos = [_check_attention(i, layer, params[types[i]][0]) for i, layer in enumerate(layers)]
    n_kv, patched = infos[0][2], [i for i in range(len(layers)) if i not in skip]
    if len({info[2] for info in infos}) != 1:
        raise TypeError("layers differ in their number of KV heads; not supported")
    # one patched layer of each layer type (its own RoPE, sliding window or not) tries the hooks
    probed = {types[i]: i for i in patched}.values()
    layouts = {_probe(infos[i][0], *params[types[i]], infos[i][1], n_kv) for i in probed}
    if len(layouts) > 1:
        raise TypeError(f"layers differ in where q and k are rotated ({sorted(layouts)}); not supported")
    handle = MsPoEHandle(model, mspoe_ratios(n_kv, float(r_min), float(r_max)), order, float(alpha), patched, n_kv,
                         bool(score_rope), layouts.pop() if layouts else "proj")
    hk, at = handle._hooks, functools.partial
    hk += [decoder.register_forward_pre_hook(handle._on_decoder, with_kwargs=True), decoder.register_forward_hook(
        handle._reset), rotary.register_forward_hook(handle._on_rotary, with_kwargs=True)]
    for i in patched:
        attn = infos[i][0]
        qk = (attn.q_proj, attn.k_proj) if handle.layout == "proj" else (attn.q_norm, attn.k_norm)
        hk += [attn.register_forward_pre_hook(at(handle._on_attn, i), with_kwargs=True),
               attn.register_forward_hook(at(handle._done, i))] + [m.register_forward_hook(at(handle._on_proj, i))
                                                                   for m in qk]
    model._mspoe_handle = handle
    return handle


@contextlib.contextmanager
def mspoe(model, *args, **kw):
    """with mspoe(model, r_min=..., ...) as handle: ... -- Ms-PoE for the block, removed even if it raises."""
    handle = apply_mspoe(model, *args, **kw)
    try:
        yield handle
    finally:
        handle.remove()


# -----------------------------------------------------------------------------
# 2. Positional hidden-state scaling (Yu et al. 2024, arXiv:2406.02536)
#
# Some channel d of the hidden states carries absolute position: averaged over inputs, its value moves
# monotonically and smoothly with the token's position. Multiplying that channel of the attention input
# (the output of each layer's input norm) by s in the middle layers (their configs: layers 10-25 of 32, s in
# {0.5, 0, -0.5, -1}) flattens the position bias of the last token's attention.
#
# Which rows, following the public code (PositionalHidden, modeling_llama_hidden_scale.py: factor, dims,
# layers, last_recompute_tokens; skip_first = 0 and change_value = False in all its configs): in a pass of
# T > n tokens (a prefill, a teacher-forced scoring) the last n = last_tokens rows attend with their query
# computed from the scaled input x' (x'_d = s * x_d) to keys computed from x' at every position, and values
# from the unscaled x; rows before T - n are the unpatched layer, queries, keys and values from x (scaling
# every row's keys instead would change every position's output). The cache keeps the keys from x' and the
# values from x, so a decoding step is all last rows. Hence generate's step logits equal one forward over
# prompt + generated tokens with last_tokens = 1 + the tokens generated before the last, and a teacher-forced
# answer of k tokens read after prompt + answer[:-1] (kv_retrieval.score_kv) is generate's with
# last_tokens = k (their validation loss feeds the whole answer: k + 1). Positions before T - n are exactly
# the unpatched model's in every layer: only the last rows change. Cost: in a patched layer a pass of more
# than n tokens runs attention twice.
#
# Mechanism: a pre-hook on each patched attention makes x'; hooks on q_proj and k_proj return the projection
# of x' (v_proj untouched), so the attention runs with queries and keys from x' (and caches those keys); a
# forward hook then runs the attention once more, unhooked and without the cache, and keeps its rows before
# T - n. "Last" is the sequence's last position: left padding (as generate and kv_retrieval.score_kv pad)
# keeps real last tokens there. A pass of more than n tokens on a filled cache (chunked prefill) is refused.

SCALES = (0.5, 0.0, -0.5, -1.0)  # the paper's grid of factors s


def _named(fn, args, kwargs) -> dict:
    """The call's arguments by name (keyword catch-alls merged in)."""
    a = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    return {**a.pop("kwargs", {}), **a}


@dataclasses.dataclass
class HiddenScaling:
    """What `hidden_scaling` returns: remove() -- or leaving its `with` block -- restores the model bit for bit."""

    model: torch.nn.Module
    channel: int
    scale: float
    layers: list
    last_tokens: int = 1
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _scaled: dict = dataclasses.field(default_factory=dict, repr=False)  # layer -> x' while its attention runs

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._scaled = [], {}
        if getattr(self.model, "_hidden_scaling_handle", None) is self:
            del self.model._hidden_scaling_handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- hooks --------------------------------------------------------------------------------
    def _before_attn(self, i, attn, args, kwargs):
        a = _named(attn.forward, args, kwargs)
        x, cache = a["hidden_states"], a.get("cache", a.get("past_key_values"))
        if x.shape[1] > self.last_tokens and cache is not None and cache.get_seq_length(attn.layer_idx) > 0:
            raise RuntimeError(f"layer {i}: {x.shape[1]} new tokens on a filled cache (chunked prefill?); hidden "
                               f"scaling recomputes only the last {self.last_tokens} rows of a pass after the first")
        xs = x.clone()
        xs[..., self.channel] *= self.scale
        self._scaled[i] = xs

    def _on_proj(self, i, proj, inp, out):
        xs = self._scaled.get(i)  # None in the unhooked rerun below
        return None if xs is None else torch.nn.functional.linear(xs, proj.weight, proj.bias)

    def _after_attn(self, i, attn, args, kwargs, out):
        self._scaled.pop(i, None)
        a = _named(attn.forward, args, kwargs)
        T, n = a["hidden_states"].shape[1], self.last_tokens
        if T <= n:
            return None  # every row is a last row
        for name in ("cache", "past_key_values"):  # the rerun must not write the cache
            if name in a:
                a[name] = None
        mask = a.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape[-1] != T:  # a static cache's mask: the prefill's keys come first
            a["attention_mask"] = mask[..., :T]
        plain = attn.forward(**a)[0]  # .forward: without this module's hooks; the projections' find no x'
        return (torch.cat([plain[:, :T - n], out[0][:, T - n:]], dim=1), *out[1:])


def _scalable_attention(i, layer):
    """Layer i's attention module, or TypeError saying why hidden scaling cannot patch it."""
    attn = getattr(layer, "self_attn", None)
    projs = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projs) or len({p.in_features for p in projs}) != 1:
        raise TypeError(f"layer {i}: no self_attn with q_proj/k_proj/v_proj linear layers on one input (e.g. a "
                        "fused qkv_proj); hidden scaling supports Llama-family attention")
    params = inspect.signature(attn.forward).parameters
    if "hidden_states" not in params or not isinstance(getattr(attn, "layer_idx", None), int):
        raise TypeError(f"layer {i}: {type(attn).__name__} takes no hidden_states or has no layer_idx")
    return attn


def hidden_scaling(model, channel: int, scale: float, layers, last_tokens: int = 1) -> HiddenScaling:
    """Scale channel `channel` of the attention input by `scale` in `layers` (Yu et al. 2024): the last
    `last_tokens` rows of a pass, and every decoding step, attend with queries and keys from the scaled input,
    values from the unscaled one (see the section comment). Use as `with hidden_scaling(...):` or call
    .remove(). TypeError: a model it cannot patch; ValueError: bad arguments; RuntimeError: already patched."""
    if any(getattr(model, a, None) is not None for a in ("_hidden_scaling_handle", "_mspoe_handle")):
        raise RuntimeError("model is already patched (hidden scaling or Ms-PoE); remove that handle first")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer stack; hidden scaling supports transformers 5.x "
                        "Llama-family models")
    layers = list(layers)
    ok = all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < len(stack) for l in layers)
    if not (ok and layers and len(set(layers)) == len(layers)):
        raise ValueError(f"layers must be distinct layer indices in [0, {len(stack)}), got {layers!r}")
    attns = {i: _scalable_attention(i, stack[i]) for i in layers}
    width = attns[layers[0]].q_proj.in_features
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < width:
        raise ValueError(f"channel must be an integer in [0, {width}), got {channel!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(last_tokens, bool) or not isinstance(last_tokens, int) or last_tokens < 1:
        raise ValueError(f"last_tokens must be an integer >= 1, got {last_tokens!r}")
    handle = HiddenScaling(model, channel, float(scale), layers, last_tokens)
    at = functools.partial
    for i, attn in attns.items():
        handle._hooks += [attn.register_forward_pre_hook(at(handle._before_attn, i), with_kwargs=True),
                          attn.register_forward_hook(at(handle._after_attn, i), with_kwargs=True),
                          attn.q_proj.register_forward_hook(at(handle._on_proj, i)),
                          attn.k_proj.register_forward_hook(at(handle._on_proj, i))]
    model._hidden_scaling_handle = handle
    return handle


# The channel search, without training (their experiments/search_dimension): average each layer's output
# hidden states (the model's output_hidden_states without the embeddings, as their get_avg_hidden_state.py;
# RMSNorm keeps channels apart, so the residual stream's channel d is the attention input's channel d) over
# random printable-character strings; in layers 2 .. L-2, call a channel monotone where a least-squares cubic
# through its min-max normalised mean curve, from position mono_skip on, has differences of one sign; keep the
# channels monotone in one direction (their majority direction; a tie counts as decreasing) in more than L // 4
# layers; rank them by smoothness, the least over those layers of the sum of squared second differences of the
# normalised curve from smooth_skip on after a Savitzky-Golay filter (window 10, cubic); the top_k go to the
# validation loss, each with every scale of the grid (theirs tried s = 0 only). Defaults are theirs: 200
# strings of 1,000 tokens, mono_skip 300, smooth_skip 200, top_k 10.


@dataclasses.dataclass
class ChannelSearch:
    """What `find_position_channel` returns. channel, scale, loss: the pick, the (candidate, scale) of least
    validation loss (None when no channel qualified); baseline_loss: unpatched. candidates: by smoothness,
    smoothest first; trend[c]: per layer +1 / -1 (monotone up / down) or 0; smoothness[c]: lower is smoother;
    losses: [channel, scale, loss] in evaluation order; monotone_channels: how many qualified before top_k."""

    channel: int | None
    scale: float | None
    loss: float | None
    baseline_loss: float
    candidates: list
    trend: dict
    smoothness: dict
    losses: list
    monotone_channels: int
    settings: dict

    def to_json(self) -> dict:
        doc = dataclasses.asdict(self)
        doc["trend"], doc["smoothness"] = ({str(k): v for k, v in d.items()} for d in (self.trend, self.smoothness))
        return doc


def random_strings(tok, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) token ids of seeded random strings of printable ASCII characters without spaces (their
    corpus, random_string.txt, is such a string), 10 characters drawn per token as their shards are."""
    chars = np.array(list(string.ascii_letters + string.digits + string.punctuation))
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n):
        ids = tok("".join(rng.choice(chars, 10 * length)), add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise ValueError(f"{10 * length} random characters gave {len(ids)} tokens, fewer than {length}")
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


@torch.inference_mode()
def mean_hidden_states(model, ids: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """(layers, positions, hidden) float64: each decoder layer's output hidden states averaged over the rows
    of ids (equal-length rows, no padding)."""
    device, total = next(model.parameters()).device, None
    for b in range(0, len(ids), batch_size):
        out = model(ids[b:b + batch_size].to(device), output_hidden_states=True, use_cache=False).hidden_states
        part = torch.stack([h.float().sum(0) for h in out[1:]])  # drop the embeddings
        total = part if total is None else total + part
    return total.double().cpu().numpy() / len(ids)


def _normalised(curves: np.ndarray) -> np.ndarray:
    """Each column min-max scaled to [0, 1] (a flat column to 0)."""
    span = np.ptp(curves, axis=0)
    return (curves - curves.min(0)) / np.where(span > 0, span, 1.0)


def position_statistics(mean: np.ndarray, mono_skip: int = 300, smooth_skip: int = 200, degree: int = 3):
    """(trend, smoothness) of mean hidden states (layers L, positions, channels): trend (L, channels) is +1 / -1
    where a least-squares polynomial of `degree` through the normalised curve from mono_skip on only rises /
    falls (0 otherwise; layers 0, 1 and L-1 are not judged); smoothness (channels,) is the least sum of squared
    second differences over the channel's monotone layers (its majority direction) of the Savitzky-Golay
    smoothed, normalised curve from smooth_skip on, or inf for a channel monotone in L // 4 layers or fewer."""
    from scipy.signal import savgol_filter

    L, T, H = mean.shape
    if T - max(mono_skip, smooth_skip) < 10:
        raise ValueError(f"{T} positions leave fewer than 10 after skipping {max(mono_skip, smooth_skip)}")
    x = np.arange(T - mono_skip, dtype=float)
    trend = np.zeros((L, H), dtype=int)
    for layer in range(2, L - 1):
        y = _normalised(mean[layer, mono_skip:])
        steps = np.diff(np.vander(x, degree + 1) @ np.polyfit(x, y, degree), axis=0)
        flat = np.ptp(y, axis=0) == 0
        trend[layer] = np.where((steps >= 0).all(0) & ~flat, 1, np.where((steps <= 0).all(0) & ~flat, -1, 0))
    up, down = (trend == 1).sum(0), (trend == -1).sum(0)
    direction = np.where(up > down, 1, -1)
    rough = np.stack([(np.diff(savgol_filter(_normalised(mean[layer, smooth_skip:]), 10, 3, axis=0), 2, axis=0) ** 2)
                      .sum(0) for layer in range(L)])
    smoothness = np.where(trend == direction, rough, np.inf).min(0)
    return trend, np.where(np.maximum(up, down) > L // 4, smoothness, np.inf)


def find_position_channel(model, tok, validation_loss, layers, scales=SCALES, samples: int = 200,
                          length: int = 1000, seed: int = 0, top_k: int = 10, mono_skip: int = 300,
                          smooth_skip: int = 200, last_tokens: int = 1, batch_size: int = 4) -> ChannelSearch:
    """The positional channel of `model` without training (see the comment above): candidates from the mean
    hidden states of `samples` random strings of `length` tokens (seeded), ranked by smoothness; then each of
    the top_k with each scale, hidden_scaling(model, channel, scale, layers, last_tokens) applied while
    validation_loss(model) -> float runs; the pick has the least loss."""
    for name, v, least in [("samples", samples, 1), ("length", length, 1), ("seed", seed, 0), ("top_k", top_k, 1),
                           ("mono_skip", mono_skip, 0), ("smooth_skip", smooth_skip, 0), ("batch_size", batch_size, 1)]:
        lr.check_int(name, v, least)
    for s in scales:  # refuse bad layers, scales or last_tokens before the long part
        hidden_scaling(model, 0, s, layers, last_tokens).remove()
    ids = random_strings(tok, samples, length, seed)
    trend, smoothness = position_statistics(mean_hidden_states(model, ids, batch_size), mono_skip, smooth_skip)
    qualified = np.flatnonzero(np.isfinite(smoothness))
    candidates = [int(c) for c in qualified[np.argsort(smoothness[qualified], kind="stable")][:top_k]]
    baseline, losses = float(validation_loss(model)), []
    for c in candidates:
        for s in scales:
            with hidden_scaling(model, c, s, layers, last_tokens):
                losses.append([c, float(s), float(validation_loss(model))])
    best = min(losses, key=lambda e: e[2]) if losses else [None, None, None]  # ties: the smoother, earlier scale
    settings = dict(samples=samples, length=length, seed=seed, layers=list(layers), scales=[float(s) for s in scales],
                    top_k=top_k, mono_skip=mono_skip, smooth_skip=smooth_skip, last_tokens=last_tokens)
    return ChannelSearch(*best, baseline, candidates, {c: trend[:, c].tolist() for c in candidates},
                         {c: float(smoothness[c]) for c in candidates}, losses, len(qualified), settings)


# -----------------------------------------------------------------------------
# 3. Attention sorting (Peysakhovich & Lerer 2023, arXiv:2310.01427) and positional attention-bias
#    calibration ("Found in the Middle", Hsieh et al. 2024, arXiv:2406.16008), on KV-retrieval records
#
# Both read one number per record: the attention the prompt's last position (the token before the answer)
# pays to the record's tokens. A pre-hook on each layer's attention module computes it from that layer's own
# inputs -- q_proj of the last position, k_proj of every position, per-head q_norm/k_norm where the family
# has them, the model's RoPE (the position_embeddings the layer receives), repeat_kv for grouped-query
# attention, the module's `scaling`, logit soft-capping where the config has it, and the 4-D mask the layer
# receives (causal, padding, sliding window) -- so only the last query row is formed, never a T x T matrix,
# and any attention implementation (SDPA) gives the same numbers as eager attention's own weights
# (output_attentions), summed over each record's tokens (tests/test_attention_sort.py, float64). It measures a
# prefill (a pass without a filled cache): the records' keys are not all in a decoding step's input.
#
# A record's tokens: the character span of its text in the prompt ('"key": "value"' in the JSON prompt, "The
# number for key is value." in the long-range one, filler excluded), mapped to tokens with the fast
# tokenizer's offsets; a token that straddles a record's edge ('{"', '",') counts for the record.
#
# Attention sorting (their algorithm): measure, reorder the records by the attention they receive, most
# attended last (nearest the question), measure again on the new order, `iterations` times, then answer. We
# aggregate a record's attention as the sum over all layers and heads (their "attention the document
# receives"; a mean over layers and heads orders alike). Default iterations = 5: our reading of the paper's
# figures (up to 5 sorts); its text could not be checked in this session.
#
# Calibration (their model, adapted): attention to a record at position k = relevance + bias(k), bias
# depending on the position only. Their recipe measures bias(k) with a dummy document placed at each position;
# in a KV prompt every record the question does not ask for is such a dummy, so bias(k, layer, head) = the
# mean attention to the records at position k that are not the gold one, over a calibration set of prompts
# (kept apart from search and held-out prompts; gold positions spread, so every position holds a dummy in most
# prompts) -- one pass per calibration prompt and no inserted record, the prompt format unchanged. Calibrated
# relevance = attention - bias, per layer and head. Two uses:
#   rerank: records ordered by their relevance summed over layers and heads, most relevant last (as attention
#     sorting orders), then answer;
#   intervention (their "found-in-the-middle" attention calibration): while the answer is read, each head of
#     each layer redistributes the attention its answer rows pay to the records, C = the rows' total attention
#     on all records, as C * softmax(relevance / temperature) over the records (relevance from the prompt's
#     last position, this layer and head); within a record its tokens keep their proportions, attention
#     outside the records is unchanged, so each row still sums to 1. Temperature 0.05 by default (an
#     attention share, not tuned on held-out prompts), all layers and heads by default (`layers` picks some):
#     our choices; the paper tunes its temperature on validation data, and the driver tunes both on calibration
#     prompts. Implemented exactly as an additive term log(new mass / old mass) on the
#     record tokens' logits, given to the layer through its attention mask (so eager and SDPA alike).
#
# Retrieval-layer rerank (ours, from the diagnosis, experiments/attention_diagnosis.py): summed over layers the
# attention follows position, but single layers can find the record asked for where the sum does not. On
# calibration prompts, choose the layer whose attention (heads summed) most often peaks on the gold record
# (retrieval_layer); order each prompt's records by that layer's attention and put the most attended where the
# model answers best -- first or last, measured on the same calibration prompts (the placement rule of AttnRank,
# arXiv 2508.05128; attention sorting always puts it last). One measuring pass per prompt.

SORT_ITERATIONS = 5


def record_char_spans(ex) -> list:
    """[(start, end)] character span of each record's text in ex.prompt, in record order."""
    text, at, spans = ex.prompt, 0, []
    for k, v in ex.records:
        piece = f"The number for {k} is {v}." if ex.filler else f'"{k}": "{v}"'
        start = text.find(piece, at)
        if start < 0:
            raise ValueError(f"record {(k, v)!r} not found in the prompt after character {at}")
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    return spans


def record_token_spans(tok, ex) -> list:
    """[(first, end)] token span of each record in kv_retrieval.prompt_ids(tok, ex) (raw prompt, with the BOS the
    tokenizer adds): the tokens whose characters overlap the record's (fast tokenizer offsets); a token two
    records share goes to the earlier. ValueError if the offsets' tokens are not the scorer's."""
    import kv_retrieval as kv

    if not getattr(tok, "is_fast", False):
        raise TypeError("record_token_spans needs a fast tokenizer (offset mapping)")
    enc = tok(ex.prompt, add_special_tokens=False, return_offsets_mapping=True)
    bos = len(kv.bos_ids(tok))
    if enc["input_ids"] != kv.encode(tok, ex.prompt):
        raise ValueError("the tokenizer's ids with offsets differ from the scorer's")
    out, last = [], 0
    for s, e in record_char_spans(ex):
        hit = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < e and b > s and b > a]
        first = max(hit[0], last)
        out.append((bos + first, bos + hit[-1] + 1))
        last = hit[-1] + 1
    return out


def _attention_parts(i, layer):
    """(attn, n_q, n_kv, head_dim, per_head_norm) of layer i, or TypeError where the hook cannot be exact."""
    attn = getattr(layer, "self_attn", None)
    names = {n for n, _ in attn.named_children()} if attn is not None else set()
    if not {"q_proj", "k_proj"} <= names or names - _ATTN_CHILDREN - _NORMS or (names & _NORMS and
                                                                                  not _NORMS <= names):
        raise TypeError(f"layer {i}: attention with children {sorted(names)}; record attention supports "
                        "Llama-family attention (q_proj/k_proj, optionally a per-head q_norm/k_norm pair)")
    D = getattr(attn, "head_dim", 0)
    n_q, n_kv = (getattr(p, "out_features", 0) // max(D, 1) for p in (attn.q_proj, attn.k_proj))
    if not (D and n_kv) or n_q % n_kv or not isinstance(getattr(attn, "scaling", None), float):
        raise TypeError(f"layer {i}: {type(attn).__name__} has no head_dim, heads or scaling")
    norm = _NORMS <= names
    if norm and any(getattr(getattr(attn, n), "weight", torch.empty(D)).numel() != D for n in _NORMS):
        raise TypeError(f"layer {i}: q_norm/k_norm act on the whole projection (OLMo2), not per head")
    return attn, n_q, n_kv, D, norm


def _qk(attn, hidden, pe, rows, n_q, n_kv, D, norm):
    """Rotated queries of `rows` (B, n_q, R, D) and all rotated keys repeated per query head (B, n_q, T, D),
    float32 or the model's wider dtype, as the layer forms them."""
    B, T, _ = hidden.shape
    cos, sin = pe
    if cos.shape[-1] != D:
        raise TypeError(f"partial rotary ({cos.shape[-1]} of {D} dims) is not supported")
    q = attn.q_proj(hidden[:, rows]).view(B, len(rows), n_q, D)
    k = attn.k_proj(hidden).view(B, T, n_kv, D)
    if norm:  # per-head RMSNorm over D: the layout it runs on does not change its values
        q, k = attn.q_norm(q), attn.k_norm(k)
    cq, sq = cos[:, rows, None], sin[:, rows, None]
    q = q * cq + lr.rotate_half(q) * sq
    k = k * cos[:, :, None] + lr.rotate_half(k) * sin[:, :, None]
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k = q.transpose(1, 2).to(dt), k.transpose(1, 2).to(dt)
    return q, k.repeat_interleave(n_q // n_kv, dim=1)


def _row_weights(attn, q, k, mask, rows, T):
    """Softmax attention weights (B, H, R, T) of query rows `rows` as the module computes them: scaling, soft-cap,
    the layer's 4-D mask (bool: keep; float: added), or causal (and sliding window) where it got none."""
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    cap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if mask is None:
        r, j = torch.as_tensor(rows, device=q.device)[:, None], torch.arange(T, device=q.device)
        keep = j <= r
        window = getattr(attn, "sliding_window", None)
        if window:
            keep &= j > r - window
        logits = logits.masked_fill(~keep, float("-inf"))
    else:
        m = mask[:, :, rows, :T]  # padding keys can hold NaN states in later layers: masked out, not added to
        keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        logits = torch.where(keep, logits if m.dtype == torch.bool else logits + m.to(logits.dtype), float("-inf"))
    return logits.softmax(-1)


def _mass(w, spans):
    """(..., N) the weights w (..., T) summed over each record's token span; spans (B, N, 2) LongTensor."""
    c = torch.nn.functional.pad(w.cumsum(-1), (1, 0))  # c[t] = sum of w[:t]
    B = w.shape[0]
    idx = spans.view(B, *([1] * (w.dim() - 2)), -1).expand(*w.shape[:-1], -1)  # (..., 2N): start, end, start, ...
    got = c.gather(-1, idx)
    return got[..., 1::2] - got[..., 0::2]


def _decoder_layers(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer stack")
    return decoder, layers


def _padded_spans(spans, pads, device):
    return torch.stack([torch.as_tensor(s, dtype=torch.long) + p for s, p in zip(spans, pads)]).to(device)


@torch.inference_mode()
def record_attention(model, tok, examples, batch_size: int = 8) -> np.ndarray:
    """(len(examples), layers, query heads, records) float64: the attention the last prompt position pays to each
    record's tokens (summed), per layer and head, one prefill pass per prompt (left-padded batches of
    `batch_size`); see the section comment. The prompts: kv_retrieval.prompt_ids (raw, with the tokenizer's BOS)."""
    import kv_retrieval as kv

    lr.check_int("batch_size", batch_size, 1)
    decoder, layers = _decoder_layers(model)
    parts = [_attention_parts(i, layer) for i, layer in enumerate(layers)]
    if any(getattr(model, a, None) is not None for a in ("_mspoe_handle", "_hidden_scaling_handle")):
        raise RuntimeError("Ms-PoE or hidden scaling changes the queries and keys after these hooks; remove it first")
    device, out = next(model.parameters()).device, [None] * len(examples)
    state = {}

    def hook(i, attn, args, kwargs):
        a = _named(attn.forward, args, kwargs)
        cache = a.get("cache", a.get("past_key_values"))
        if cache is not None and cache.get_seq_length(attn.layer_idx) > 0:
            raise RuntimeError("record_attention measures a prefill, not a pass on a filled cache")
        hidden, T = a["hidden_states"], a["hidden_states"].shape[1]
        _, n_q, n_kv, D, norm = parts[i]
        q, k = _qk(attn, hidden, a["position_embeddings"], [T - 1], n_q, n_kv, D, norm)
        w = _row_weights(attn, q, k, a.get("attention_mask"), [T - 1], T)[:, :, 0]  # (B, H, T)
        state["mass"][:, i] = _mass(w, state["spans"]).double()

    hooks = [p[0].register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True) for i, p in enumerate(parts)]
    try:
        prompts = [kv.prompt_ids(tok, ex) for ex in examples]
        spans = [record_token_spans(tok, ex) for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = kv._left_padded(tok, [prompts[i] for i in idx], device)
            T = batch["input_ids"].shape[1]
            state["spans"] = _padded_spans([spans[i] for i in idx], [T - len(prompts[i]) for i in idx], device)
            state["mass"] = torch.zeros(len(idx), len(parts), parts[0][1], len(spans[idx[0]]), dtype=torch.float64,
                                        device=device)
            model(**batch, use_cache=False, logits_to_keep=1)
            for row, i in enumerate(idx):
                out[i] = state["mass"][row].cpu().numpy()
    finally:
        for h in hooks:
            h.remove()
    return np.stack(out)


def reorder(ex, scores):
    """ex with its records ordered by increasing score (stable): the highest scored last, the gold moved along."""
    import kv_retrieval as kv

    if len(scores) != len(ex.records):
        raise ValueError(f"{len(scores)} scores for {len(ex.records)} records")
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    records = tuple(ex.records[j] for j in order)
    return kv.KVExample(records, ex.key, ex.value, records.index((ex.key, ex.value)), ex.filler, ex.query_aware)


@dataclasses.dataclass
class Sorted:
    """What attention_sort and calibrated_rerank return: the reordered examples (input order) and, per example, the
    gold's index after each round (gold_path[i][0] = its original index, [-1] = where it was answered)."""

    examples: list
    gold_path: list
    forwards: int  # forward passes per prompt spent measuring (the answer's pass not included)
    attention: np.ndarray | None = None  # the first measurement, on the prompts as given (record_attention's)


def attention_sort(model, tok, examples, iterations: int = SORT_ITERATIONS, batch_size: int = 8) -> Sorted:
    """Attention sorting (see the section comment): `iterations` rounds of measuring record_attention and putting
    the most attended records last (sum over layers and heads). Score the returned examples to answer."""
    lr.check_int("iterations", iterations, 1)
    current, path, first = list(examples), [[ex.gold_index] for ex in examples], None
    for _ in range(iterations):
        att = record_attention(model, tok, current, batch_size)
        first = att if first is None else first
        current = [reorder(ex, a) for ex, a in zip(current, att.sum(axis=(1, 2)))]
        for p, ex in zip(path, current):
            p.append(ex.gold_index)
    return Sorted(current, path, iterations, first)


def position_bias(model, tok, examples, batch_size: int = 8) -> np.ndarray:
    """(layers, heads, records) the mean attention to the records at each position that the question does not ask
    for (the dummies of the calibration), over `examples` (a calibration set; every example with as many records).
    ValueError if some position never holds a dummy."""
    n = {len(ex.records) for ex in examples}
    if len(n) != 1:
        raise ValueError(f"calibration examples must all have one record count, got {sorted(n)}")
    att = record_attention(model, tok, examples, batch_size)  # (n, L, H, N)
    dummy = np.ones((len(examples), n.pop()), dtype=bool)
    dummy[np.arange(len(examples)), [ex.gold_index for ex in examples]] = False
    if not dummy.any(0).all():
        raise ValueError("some record position holds no dummy in the calibration set")
    return (att * dummy[:, None, None]).sum(0) / dummy.sum(0)


def calibrated_relevance(attention: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """attention (..., layers, heads, records) - bias (layers, heads, records): the calibrated relevance."""
    if attention.shape[-3:] != bias.shape:
        raise ValueError(f"attention {attention.shape} and bias {bias.shape} do not match (layers, heads, records)")
    return attention - bias


def calibrated_rerank(model, tok, examples, bias: np.ndarray, batch_size: int = 8) -> Sorted:
    """The records ordered by calibrated relevance summed over layers and heads, most relevant last (one measuring
    pass per prompt). Score the returned examples to answer."""
    att = record_attention(model, tok, examples, batch_size)
    return _reranked(examples, calibrated_relevance(att, bias).sum(axis=(1, 2)), att)


def _reranked(examples, scores, attention) -> Sorted:
    """One measuring pass's rerank: each example's records ordered by its scores (reorder), the gold's path."""
    current = [reorder(ex, s) for ex, s in zip(examples, scores)]
    return Sorted(current, [[a.gold_index, b.gold_index] for a, b in zip(examples, current)], 1, attention)


def retrieval_layer(attention: np.ndarray, gold_index) -> tuple:
    """(layer, hits): hits[l] = the share of prompts on which layer l's attention (summed over heads) is highest on
    the gold record, from record_attention's (prompts, layers, heads, records) -- or head-averaged (prompts, layers,
    records) -- measured on calibration prompts with gold indices `gold_index`. The layer with most hits; ties go
    to the higher mean attention share on the gold record, then to the earlier layer."""
    att = np.asarray(attention, dtype=float)
    att = att.sum(axis=2) if att.ndim == 4 else att
    gold = np.asarray(gold_index)
    if att.ndim != 3 or gold.shape != (att.shape[0],) or not len(gold):
        raise ValueError(f"attention {np.shape(attention)} and gold indices {gold.shape} do not match "
                         "(prompts, layers, [heads,] records) and (prompts,)")
    if gold.min() < 0 or gold.max() >= att.shape[-1]:
        raise ValueError(f"gold indices must lie in [0, {att.shape[-1]}), got {gold.min()}..{gold.max()}")
    on_gold = att[np.arange(len(gold)), :, gold]  # (prompts, layers)
    hits = (att.argmax(-1) == gold[:, None]).mean(0)
    share = (on_gold / att.sum(-1).clip(1e-30)).mean(0)
    layer = max(range(len(hits)), key=lambda i: (hits[i], share[i], -i))
    return layer, hits


def layer_rerank(model, tok, examples, layer: int, place: str = "last", batch_size: int = 8) -> Sorted:
    """The records ordered by the attention layer `layer` pays them (record_attention, heads summed), its most
    attended record at `place`: "last" (nearest the question, descending towards it) or "first" (the order
    reversed). One measuring pass per prompt; score the returned examples to answer."""
    if place not in ("first", "last"):
        raise ValueError(f"place must be 'first' or 'last', got {place!r}")
    n = len(_decoder_layers(model)[1])
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
        raise ValueError(f"layer must be an int in [0, {n}), got {layer!r}")
    att = record_attention(model, tok, examples, batch_size)
    return _reranked(examples, att[:, layer].sum(axis=1) * (1 if place == "last" else -1), att)


@dataclasses.dataclass
class CalibratedAttention:
    """What calibrated_attention returns; remove() (or leaving its with block) restores the model bit for bit."""

    model: torch.nn.Module
    temperature: float
    prompts: dict  # tuple(prompt ids) -> (spans (N, 2) LongTensor, relevance (L, H, N) tensor)
    _hooks: list = dataclasses.field(default_factory=list, repr=False)
    _batch: dict = dataclasses.field(default_factory=dict, repr=False)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._batch = [], {}
        if getattr(self.model, "_calibrated_attention_handle", None) is self:
            del self.model._calibrated_attention_handle

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _on_model(self, model, args, kwargs):
        """Finds each batch row's prompt (a known prompt's ids at the start of its real tokens) and its first answer
        row (the prompt's last position); rows of unknown prompts are left alone."""
        a = _named(model.forward, args, kwargs)
        ids, mask = a.get("input_ids"), a.get("attention_mask")
        cache = a.get("cache", a.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise RuntimeError("calibrated attention re-weights a full pass (teacher-forced answer), not a cached step")
        self._batch = {}
        lengths = {len(p) for p in self.prompts}
        for b in range(ids.shape[0]):
            real = ids[b] if mask is None else ids[b][mask[b].bool()]
            pad = ids.shape[1] - len(real)
            hit = next((p for n in lengths if n <= len(real) and (p := tuple(real[:n].tolist())) in self.prompts), None)
            if hit is not None:
                self._batch[b] = (pad, pad + len(hit) - 1, *self.prompts[hit])

    def _on_attn(self, i, parts, attn, args, kwargs):
        if not self._batch:
            return None
        a = _named(attn.forward, args, kwargs)
        hidden, T = a["hidden_states"], a["hidden_states"].shape[1]
        first = min(v[1] for v in self._batch.values())
        rows = list(range(first, T))
        _, n_q, n_kv, D, norm = parts
        q, k = _qk(attn, hidden, a["position_embeddings"], rows, n_q, n_kv, D, norm)
        base = a.get("attention_mask")
        w = _row_weights(attn, q, k, base, rows, T)  # (B, H, R, T)
        B = hidden.shape[0]
        bias = torch.zeros(B, n_q, T, T, dtype=w.dtype, device=w.device)
        for b, (pad, start, spans, rel) in self._batch.items():
            sp = spans.to(w.device) + pad
            mass = _mass(w[b:b + 1, :, start - first:], sp[None])[0]  # (H, R', N)
            total = mass.sum(-1, keepdim=True)
            # records the layer cannot see (outside a sliding window) get no share
            logit = (rel[i].to(w)[:, None] / self.temperature).masked_fill(mass <= 0, float("-inf"))
            new = total * torch.softmax(logit, dim=-1).nan_to_num(0.0)
            ratio = torch.log(new.clamp_min(1e-30) / mass.clamp_min(1e-30))  # (H, R', N)
            for j, (s, e) in enumerate(sp.tolist()):
                bias[b, :, start:, s:e] = ratio[:, :, j, None]
        if base is None:
            r, j = torch.arange(T, device=w.device)[:, None], torch.arange(T, device=w.device)
            keep = j <= r
            if getattr(attn, "sliding_window", None):
                keep &= j > r - attn.sliding_window
            base = keep[None, None]
        base = base[..., :T]
        dt = hidden.dtype
        if base.dtype == torch.bool:
            full = torch.where(base, bias.to(dt), torch.finfo(dt).min)
        else:
            full = base.to(dt) + bias.to(dt)
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"layer {i}: the attention mask was not passed by keyword; cannot re-weight it")
        return args, dict(kwargs, attention_mask=full)


def calibrated_attention(model, tok, examples, relevance: np.ndarray, temperature: float = 0.05,
                         layers=None) -> CalibratedAttention:
    """Found-in-the-middle attention calibration while `examples` are answered (see the section comment): any
    pass of the model whose row starts with one of their prompts (kv_retrieval.prompt_ids) gets, in every head of
    each of `layers` (default: all), the attention of its rows from the prompt's last position on redistributed
    over the records as C * softmax(relevance / temperature). relevance: (len(examples), layers, heads, records),
    e.g. calibrated_relevance(record_attention(...), bias). Use as a with block or call .remove()."""
    import kv_retrieval as kv

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or \
            not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    decoder, stack = _decoder_layers(model)
    parts = [_attention_parts(i, layer) for i, layer in enumerate(stack)]
    chosen = range(len(stack)) if layers is None else list(layers)
    if not chosen or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(stack)
                         for i in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be distinct ints in [0, {len(stack)}), at least one; got {layers!r}")
    if relevance.shape[:3] != (len(examples), len(stack), parts[0][1]):
        raise ValueError(f"relevance {relevance.shape} is not (examples, layers, heads, records) = "
                         f"({len(examples)}, {len(stack)}, {parts[0][1]}, ...)")
    if any(getattr(model, a, None) is not None for a in ("_mspoe_handle", "_hidden_scaling_handle",
                                                          "_calibrated_attention_handle")):
        raise RuntimeError("model is already patched (Ms-PoE, hidden scaling or calibrated attention)")
    prompts = {}
    for ex, rel in zip(examples, relevance):
        spans = record_token_spans(tok, ex)
        if len(spans) != rel.shape[-1]:
            raise ValueError(f"{len(spans)} records but relevance for {rel.shape[-1]}")
        prompts[tuple(kv.prompt_ids(tok, ex))] = (torch.tensor(spans), torch.as_tensor(rel))
    handle = CalibratedAttention(model, float(temperature), prompts)
    handle._hooks.append(model.register_forward_pre_hook(handle._on_model, with_kwargs=True))
    for i in chosen:
        handle._hooks.append(parts[i][0].register_forward_pre_hook(functools.partial(handle._on_attn, i, parts[i]),
                                                                   with_kwargs=True))
    model._calibrated_attention_handle = handle
    return handle
