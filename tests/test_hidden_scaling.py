"""Positional hidden-state scaling (baselines.hidden_scaling, Yu et al. 2024) on tiny random-weight models: scale 1
and removal bitwise, only the last rows change, one layer against an independent float64 oracle, left-padded
batches, cached generation against one forward, refusals; the channel search's statistics on synthetic curves and
on a tiny model with a planted position ramp; one forward of the embedded SmolLM2-135M.
"""

import json
import math

import numpy as np
import pytest
import torch

import baselines as bl
from conftest import tiny_llama
from tiny_models import ids, maxdiff, single_thread, tiny  # noqa: F401

ATTNS = ["eager", "sdpa"]


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def left_pad(seqs, pad=0):
    T = max(len(s) for s in seqs)
    x, mask = torch.full((len(seqs), T), pad), torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, T - len(s):], mask[b, T - len(s):] = s, 1
    return x, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# -- independent float64 oracle of one attention layer ----------------------------------------------------

def heads64(attn, x):
    """q (B, Hq, T, D), k, v (B, Hkv, T, D) in float64 from the projection weights (no bias in Llama)."""
    B, T, _ = x.shape
    return [(x.double() @ p.weight.double().T).view(B, T, -1, attn.head_dim).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)]


def rope64(t, theta):
    D, T = t.shape[-1], t.shape[-2]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s, t1, t2 = ang.cos(), ang.sin(), t[..., :D // 2], t[..., D // 2:]
    return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)


def attend64(q, k, v):
    G, T = q.shape[1] // k.shape[1], q.shape[2]
    w = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    w = w.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return w @ v.repeat_interleave(G, 1)


@torch.no_grad()
def oracle(attn, x, channel, scale, n, theta):
    """Rows before T - n: the plain layer; the last n: query and keys from x with the channel scaled, values from x."""
    B, T, _ = x.shape
    xs = x.double().clone()
    xs[..., channel] *= scale
    (q, k, v), (qs, ks, _) = heads64(attn, x), heads64(attn, xs)
    plain, last = attend64(rope64(q, theta), rope64(k, theta), v), attend64(rope64(qs, theta), rope64(ks, theta), v)
    out = torch.cat([plain[:, :, :T - n], last[:, :, T - n:]], dim=2).transpose(1, 2).reshape(B, T, -1)
    return out @ attn.o_proj.weight.double().T


# -- exactness, removal -------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("n", [1, 3])
def test_scale_one_is_the_unpatched_model_bitwise(attn, n):
    model, x = tiny("llama", attn), ids(2, 12)
    ref = logits(model, x)
    with bl.hidden_scaling(model, 5, 1.0, [0, 1, 2], last_tokens=n):
        assert torch.equal(logits(model, x), ref)


@pytest.mark.parametrize("attn", ATTNS)
def test_only_the_last_rows_change(attn):
    """Rows before the last n are the unpatched model's in every layer (bit for bit); the last n move."""
    model, x = tiny("llama", attn), ids(2, 12)
    ref = logits(model, x)
    for n in (1, 4):
        with bl.hidden_scaling(model, 7, -1.0, [1, 2], last_tokens=n):
            out = logits(model, x)
        assert torch.equal(out[:, :-n], ref[:, :-n])
        assert all(maxdiff(out[:, t], ref[:, t]) > 1e-2 for t in range(12 - n, 12))


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("n", [1, 4])
def test_one_layer_equals_float64_oracle(attn, n):
    """8 query heads in 4 KV groups: layer 1's attention output under the patch = the float64 oracle on its input."""
    model, x = tiny("llama", attn, num_attention_heads=8, num_key_value_heads=4), ids(3, 18, seed=5)
    layer, store = model.model.layers[1].self_attn, {}
    theta = model.config.rope_parameters["rope_theta"]
    with bl.hidden_scaling(model, 9, -0.5, [0, 1], last_tokens=n):
        # registered after the patch's hooks: sees the attention's input and its final (patched) output
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: store.__setitem__("x", k["hidden_states"]),
                                                 with_kwargs=True),
                 layer.register_forward_hook(lambda m, a, o: store.__setitem__("out", o[0]))]
        logits(model, x)
        [h.remove() for h in hooks]
    want = oracle(layer, store["x"], 9, -0.5, n, theta)
    assert maxdiff(store["out"], want) < 1e-5
    assert maxdiff(want, oracle(layer, store["x"], 9, 1.0, n, theta)) > 1e-2  # the scaling mattered


def test_remove_and_context_manager_restore_bitwise():
    model, x = tiny("llama", "sdpa"), ids(1, 16)
    ref = logits(model, x)
    h = bl.hidden_scaling(model, 3, 0.0, [0, 1, 2])
    assert maxdiff(logits(model, x), ref) > 1e-3
    with pytest.raises(RuntimeError, match="already patched"):
        bl.hidden_scaling(model, 3, 0.0, [0])
    with pytest.raises(RuntimeError, match="already patched"):
        bl.apply_mspoe(model)
    h.remove()
    assert torch.equal(logits(model, x), ref) and not hasattr(model, "_hidden_scaling_handle")
    with pytest.raises(KeyError):
        with bl.hidden_scaling(model, 3, -1.0, [2]):
            raise KeyError("inside the block")
    assert torch.equal(logits(model, x), ref) and not hasattr(model, "_hidden_scaling_handle")
    with bl.mspoe(model):
        with pytest.raises(RuntimeError, match="already patched"):
            bl.hidden_scaling(model, 3, 0.0, [0])


# -- padded batches, generation -----------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTNS)
def test_left_padded_batch_equals_each_example_alone(attn):
    model = tiny("llama", attn)
    seqs = [ids(1, 14, seed=10)[0], ids(1, 9, seed=11)[0], ids(1, 12, seed=15)[0]]
    x, mask, pos = left_pad(seqs)
    with bl.hidden_scaling(model, 4, -1.0, [0, 1, 2], last_tokens=2):
        batch = logits(model, x, attention_mask=mask, position_ids=pos)
        for b, s in enumerate(seqs):
            assert maxdiff(batch[b, -len(s):], logits(model, s[None])[0]) < 1e-5


@pytest.mark.parametrize("attn", ATTNS)
def test_generate_with_cache_equals_one_forward(attn):
    """Each decoding step is a last row: generate's step logits = one forward over prompt + generated tokens with
    last_tokens = 1 + the tokens generated before the last."""
    model = tiny("llama", attn)
    x, mask, _ = left_pad([ids(1, 10, seed=20)[0], ids(1, 7, seed=21)[0]])
    with bl.hidden_scaling(model, 6, -1.0, [0, 1, 2]):
        out = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
    seq, steps = out.sequences[:, :-1], torch.stack(out.logits, 1)  # steps predict positions T .. T+4
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    kw = dict(attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    with bl.hidden_scaling(model, 6, -1.0, [0, 1, 2], last_tokens=5):
        full = logits(model, seq, **kw)[:, -5:]
    assert maxdiff(steps, full) < 1e-5
    assert maxdiff(steps, logits(model, seq, **kw)[:, -5:]) > 1e-2  # the unpatched model differs


# -- refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, words", [("gpt2", "no decoder layer stack"), ("phi3", "q_proj/k_proj/v_proj")])
def test_refuses_models_it_cannot_patch(family, words):
    model = tiny(family)
    with pytest.raises(TypeError, match=words):
        bl.hidden_scaling(model, 0, 0.0, [0])
    assert not hasattr(model, "_hidden_scaling_handle")


def test_refuses_several_new_tokens_on_a_filled_cache():
    model, x = tiny("llama"), ids(1, 10)
    with bl.hidden_scaling(model, 0, 0.0, [1]), torch.no_grad():
        cache = model(x[:, :6], use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="filled cache"):
            model(x[:, 6:], cache=cache)


@pytest.mark.parametrize("kw", [dict(channel=32), dict(channel=-1), dict(channel=1.0), dict(channel=True),
                                dict(scale=float("nan")), dict(scale=float("inf")), dict(scale="0"),
                                dict(layers=[3]), dict(layers=[-1]), dict(layers=[]), dict(layers=[1, 1]),
                                dict(last_tokens=0)])
def test_bad_arguments(kw):
    model = tiny("llama")
    with pytest.raises(ValueError):
        bl.hidden_scaling(model, **{**dict(channel=0, scale=0.0, layers=[0, 1]), **kw})
    assert not hasattr(model, "_hidden_scaling_handle")


# -- the channel search -----------------------------------------------------------------------------------------

def test_position_statistics_on_synthetic_curves():
    """5 layers, 60 positions, 4 channels: a smooth rise, a rise with wiggles, a bump, a constant."""
    t = np.linspace(0, 1, 60)
    rng = np.random.default_rng(0)
    curves = [t ** 2, t + 0.02 * np.sin(40 * t), np.sin(np.pi * t), np.ones(60)]
    mean = np.stack([np.stack(curves, 1) + 1e-4 * rng.standard_normal((60, 4)) * (c < 3) for c in range(5)])
    trend, smooth = bl.position_statistics(mean, mono_skip=5, smooth_skip=5)
    assert trend[2:4].tolist() == [[1, 1, 0, 0]] * 2 and not trend[[0, 1, 4]].any()  # layers 2 .. L-2 judged
    assert smooth[0] < smooth[1] and np.isinf(smooth[2:]).all()
    with pytest.raises(ValueError, match="positions"):
        bl.position_statistics(mean, mono_skip=55)


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 3 for c in text]}


def test_find_position_channel_picks_a_planted_ramp():
    """A tiny model (small weights: a quiet residual stream) whose embeddings get a position-linear ramp on
    channel 13: the statistics rank it first among the channels that qualify, and the validation loss (distance
    to the model with channel 13 scaled by -0.5) picks it with its scale."""
    model, planted, layers = tiny_llama(num_layers=8), 13, [2, 3, 4, 5]

    def ramp(module, inp, out):
        out = out.clone()
        out[..., planted] += torch.linspace(0, 1, out.shape[1])
        return out

    model.model.embed_tokens.register_forward_hook(ramp)
    x = ids(4, 20, seed=3)
    with bl.hidden_scaling(model, planted, -0.5, layers):
        target = logits(model, x)[:, -1]
    calls = []

    def validation_loss(m):
        h = getattr(m, "_hidden_scaling_handle", None)
        calls.append(None if h is None else (h.channel, h.scale))
        return float(((logits(m, x)[:, -1] - target) ** 2).mean())

    res = bl.find_position_channel(model, CharTokenizer(), validation_loss, layers, samples=8, length=48, seed=1,
                                   top_k=3, mono_skip=8, smooth_skip=8, batch_size=4)
    assert res.candidates[0] == planted and len(res.candidates) == 3 and res.trend[planted][2:7] == [1] * 5
    assert res.smoothness[planted] < res.smoothness[res.candidates[1]] / 10 and res.monotone_channels > 3
    assert (res.channel, res.scale, res.loss) == (planted, -0.5, 0.0) and res.baseline_loss > 0
    assert calls == [None] + [(c, s) for c in res.candidates for s in bl.SCALES]  # patched while it ran
    assert len(res.losses) == 4 * len(res.candidates) and not hasattr(model, "_hidden_scaling_handle")
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["channel"] == planted and doc["settings"]["seed"] == 1 and str(planted) in doc["smoothness"]


def test_find_position_channel_refuses_bad_settings_before_the_long_part():
    model = tiny_llama(num_layers=2)

    def untouched(*a, **k):
        raise AssertionError("ran")

    for kw in (dict(layers=[5]), dict(scales=(0.0, float("nan"))), dict(last_tokens=0), dict(samples=0)):
        with pytest.raises(ValueError):
            bl.find_position_channel(model, untouched, untouched, **{"layers": [0, 1], **kw})
    assert not hasattr(model, "_hidden_scaling_handle")


# -- the embedded model ------------------------------------------------------------------------------------------

def test_embedded_smollm2_forward(smollm2):
    model, tok = smollm2
    text = " ".join(f"The key k{i} has value {1000 + 37 * i}." for i in range(20)) + " The value of key k7 is"
    x = tok(text, return_tensors="pt")["input_ids"]
    ref = logits(model, x)
    with bl.hidden_scaling(model, 100, -1.0, range(10, 20)) as h:
        out = logits(model, x)
    assert h.layers == list(range(10, 20)) and torch.isfinite(out).all()
    assert torch.equal(out[:, :-1], ref[:, :-1]) and maxdiff(out[:, -1], ref[:, -1]) > 1e-2
    assert torch.equal(logits(model, x), ref)
