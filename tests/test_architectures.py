"""The patch on tiny random-weight models of every supported transformers 5.x family (issue 4).

For each family in tiny_models.FAMILIES:
- a uniform factor s equals the family's own `linear` rope type with factor s (bit for bit in float32);
- all-ones equals the unpatched model, and so does the model after `remove()` (bit for bit);
- per-layer factors give layer l exactly the cos/sin of the family's own linear rotary module with factor
  s_l (an oracle built from transformers' code, not from layer_rope's);
- cached decoding (prefill, then one token at a time) equals one full forward.
Families whose RoPE cannot be scaled exactly (tiny_models.REFUSED) are refused with a clear error.
"""

import pytest
import torch

import layer_rope as lr
from tiny_models import FAMILIES, REFUSED, build, config, ids, maxdiff, same_weights, single_thread, supports_sdpa, tiny, with_linear_rope  # noqa: F401


FAMILY_NAMES = sorted(FAMILIES)
S = 2.5
PER_LAYER = [1.0, 3.0, 1.75]  # one unscaled layer, two different factors


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


# -- uniform factor == the family's own `linear` rope type ----------------------------------------

@pytest.mark.parametrize("family,attn", [(f, a) for f in FAMILY_NAMES for a in ("eager", "sdpa")
                                         if a == "eager" or supports_sdpa(f)])
def test_uniform_factor_equals_linear_rope_type(family, attn):
    model = tiny(family, attn)
    linear = same_weights(model, with_linear_rope(model.config, S), attn)
    x = ids()
    plain, want = logits(model, x), logits(linear, x)
    assert maxdiff(plain, want) > 1e-2, "the linear rope type should change these logits (test is vacuous)"
    with lr.scaled(model, [S] * lr.num_layers(model)):
        got = logits(model, x)
    assert torch.equal(got, want), f"{family}/{attn}: max abs diff {maxdiff(got, want):.3g} (expected bitwise)"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_all_ones_and_removed_equal_unpatched(family):
    model = tiny(family)
    x = ids()
    before = logits(model, x)
    handle = lr.apply(model, [1.0] * lr.num_layers(model))
    assert torch.equal(logits(model, x), before)
    handle.set_factors([S] * lr.num_layers(model))
    assert maxdiff(logits(model, x), before) > 1e-2  # the hooks are live
    handle.remove()
    assert not handle.active and not hasattr(model, "_layer_rope_handle")
    assert torch.equal(logits(model, x), before)


# -- per-layer factors against an oracle built from transformers' own linear rotary modules ---------

class LinearRopeOracle:
    """Hooks an unpatched model so decoder layer l gets the cos/sin of the family's own rotary module built
    from a `linear` config with factor s_l, called on the same (x, position_ids[, layer_type]) as the model's
    rotary module. The layer's type comes from config.layer_types; nothing here uses layer_rope."""

    def __init__(self, model, factors):
        self.decoder = model.get_decoder()
        rotary = self.decoder.rotary_emb
        self.mixed = isinstance(getattr(rotary, "rope_type", None), dict)
        self.rotaries = {s: type(rotary)(config=with_linear_rope(model.config, s)) for s in set(factors)}
        self.calls = {}
        self.hooks = [rotary.register_forward_hook(self.on_rotary, with_kwargs=True)]
        for i, layer in enumerate(self.decoder.layers):
            if factors[i] != 1.0:
                hook = (lambda s, lt: lambda mod, a, kw: (a, dict(kw, position_embeddings=self.scaled(s, lt))))(
                    factors[i], model.config.layer_types[i] if self.mixed else None)
                self.hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def on_rotary(self, mod, args, kwargs, out):
        a = list(args) + [kwargs[k] for k in ("x", "position_ids", "layer_type") if k in kwargs]
        self.calls[a[2] if self.mixed else None] = (a[0], a[1])

    def scaled(self, s, layer_type):
        x, pos = self.calls[layer_type]
        rot = self.rotaries[s]
        with torch.no_grad():
            return rot(x, pos, layer_type) if self.mixed else rot(x, pos)

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_per_layer_factors_match_linear_rotary_oracle(family):
    attn = "sdpa" if family in ("llama", "gemma3_text") else "eager"
    model = tiny(family, attn)
    twin = same_weights(model, model.config, attn)
    x = ids()
    oracle = LinearRopeOracle(twin, PER_LAYER)
    want = logits(twin, x)
    oracle.remove()
    assert maxdiff(want, logits(twin, x)) > 1e-2  # the oracle does scale something
    with lr.scaled(model, PER_LAYER):
        got = logits(model, x)
    assert maxdiff(got, want) <= 1e-5, f"{family}: max abs diff {maxdiff(got, want):.3g}"
    # a factor on the wrong layer would show: reversed factors differ from the oracle
    with lr.scaled(model, PER_LAYER[::-1]):
        assert maxdiff(logits(model, x), want) > 1e-3


# -- cached decoding == one full forward -------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_decoding_equals_full_forward(family):
    attn = "sdpa" if family in ("qwen3", "gemma3_text", "olmo3") else "eager"
    model = tiny(family, attn)
    x = ids(length=12)
    with lr.scaled(model, PER_LAYER), torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        assert maxdiff(out.logits, full[:, :9]) <= 1e-5
        for t in range(9, 12):  # three decoding steps, one token each
            out = model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            d = maxdiff(out.logits[:, -1], full[:, t])
            assert d <= 1e-5, f"{family}: step {t} differs from the full forward by {d:.3g}"
    # and the cached run really was scaled: the unpatched model differs
    assert maxdiff(logits(model, x), full) > 1e-3


# -- several RoPEs per model (Gemma3 / OLMo3 local and global layers) ------------------------------

@pytest.mark.parametrize("family", ["gemma3_text", "olmo3"])
def test_mixed_rope_factor_composes_with_each_layer_types_own_rope(family):
    """Real Gemma3 checkpoints ship a linear factor 8 on the global layers only. A layer_rope factor s
    multiplies each layer's own RoPE: global layers end at linear 8*s, local ones at linear s."""
    cfg = config(family)
    cfg.rope_parameters["full_attention"] = dict(cfg.rope_parameters["full_attention"], rope_type="linear",
                                                 factor=8.0)
    model = build(cfg)
    want_model = same_weights(model, with_linear_rope(cfg, S))
    assert want_model.config.rope_parameters["full_attention"]["factor"] == 8.0 * S
    assert want_model.config.rope_parameters["sliding_attention"]["factor"] == S
    x = ids()
    want = logits(want_model, x)
    with lr.scaled(model, [S] * lr.num_layers(model)):
        got = logits(model, x)
    # (inv_freq / 8) / s vs inv_freq / (8 s): equal up to float32 rounding, not bitwise
    assert maxdiff(got, want) <= 1e-5, f"max abs diff {maxdiff(got, want):.3g}"
    assert maxdiff(got, logits(model, x)) > 1e-2


def test_mixed_rope_layers_get_their_own_layer_types_rope():
    """Scaling only the global layer of a local/global/local Gemma3 changes only what the global layer sees."""
    model = tiny("gemma3_text")
    assert model.config.layer_types[1] == "full_attention"
    x = ids()

    def cos_seen_by_layers():  # registered last, these pre-hooks see what each layer really gets
        seen = {}
        hooks = [layer.register_forward_pre_hook(
            (lambda i: lambda mod, a, kw: seen.__setitem__(i, kw["position_embeddings"][0].clone()))(i),
            with_kwargs=True) for i, layer in enumerate(model.model.layers)]
        logits(model, x)
        for h in hooks:
            h.remove()
        return seen

    plain = cos_seen_by_layers()
    with lr.scaled(model, [1.0, 4.0, 1.0]):
        seen = cos_seen_by_layers()
    assert torch.equal(seen[0], plain[0]) and torch.equal(seen[2], plain[2])
    rot = model.model.rotary_emb
    pos = torch.arange(x.shape[1])[None]
    want, _ = lr.rope_cos_sin(pos, rot.full_attention_inv_freq, 4.0, rot.full_attention_attention_scaling)
    assert torch.equal(seen[1], want)
    assert not torch.equal(seen[1], plain[1])
    assert not torch.equal(plain[1], plain[0])  # local and global RoPE differ (bases 1e4 vs 1e6)


# -- refused families ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_family_is_refused_clearly(family):
    extra, exc, words = REFUSED[family]
    model = tiny(family, **extra)
    x = ids()
    before = logits(model, x)
    with pytest.raises(exc, match=words.replace("`", ".")):
        lr.apply(model, [2.0] * model.config.num_hidden_layers)
    assert not hasattr(model, "_layer_rope_handle")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, x), before)


# -- dtypes and devices ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_half_precision_matches_linear_rope_type(family, dtype):
    """cos/sin are computed in float32 and cast to the activations' dtype, exactly as the model does."""
    model = tiny(family, "sdpa", dtype=dtype)
    linear = same_weights(model, with_linear_rope(model.config, S), "sdpa", dtype=dtype)
    seen = []
    h = model.model.layers[0].register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["position_embeddings"]), with_kwargs=True)
    x = ids()
    with lr.scaled(model, [S] * lr.num_layers(model)):
        got = logits(model, x)
    h.remove()
    want = logits(linear, x)
    assert got.dtype == dtype and all(t.dtype == dtype for t in seen[0])
    assert torch.equal(got, want), f"{family}/{dtype}: max abs diff {maxdiff(got, want):.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_cuda_matches_linear_rope_type(family, dtype):
    model = tiny(family, "sdpa", dtype=dtype).cuda()
    linear = same_weights(model, with_linear_rope(model.config, S), "sdpa", dtype=dtype).cuda()
    x = ids().cuda()
    with lr.scaled(model, PER_LAYER):
        per_layer = logits(model, x)
        assert per_layer.device.type == "cuda"
    with lr.scaled(model, [S] * lr.num_layers(model)):
        got = logits(model, x)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert maxdiff(got, logits(linear, x)) <= atol
    with lr.scaled(model, PER_LAYER), torch.no_grad():  # cached decoding on the device
        full = model(x).logits
        out = model(x[:, :-1], use_cache=True)
        out = model(x[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        assert maxdiff(out.logits[:, -1], full[:, -1]) <= atol
