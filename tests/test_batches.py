"""Padded batches under the patch: every example's logits equal its own unbatched run (issue 4).

Left padding (what generation uses) and right padding, with attention masks and explicit position_ids
counted from each example's first real token, for eager and SDPA attention, one-RoPE and local/global
families, with per-layer factors.
"""

import pytest
import torch

import layer_rope as lr
from tiny_models import ids, maxdiff, same_weights, single_thread, tiny, with_linear_rope  # noqa: F401



LENGTHS = [12, 9, 5]
FACTORS = [1.0, 3.0, 1.75]
PAD = 0
CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa"), ("phi3", "eager"), ("gemma2", "eager"),
         ("gemma3_text", "sdpa"), ("gemma3_text", "eager")]


def examples():
    return [ids(length=n, seed=10 + i)[0] for i, n in enumerate(LENGTHS)]


def pad_batch(seqs, side):
    """(input_ids, attention_mask, position_ids); positions count real tokens only, pads get position 1 as in
    transformers' generate (any value: they are masked)."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), PAD)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        x[b, sl], mask[b, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return x, mask, pos


def real(t, b, n, T, side):
    """Rows of example b (length n) in a padded batch tensor of length T."""
    return t[b, T - n:] if side == "left" else t[b, :n]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family,attn", CASES)
def test_padded_batch_equals_unbatched(family, attn, side):
    model = tiny(family, attn)
    seqs = examples()
    x, mask, pos = pad_batch(seqs, side)
    T = x.shape[1]
    with lr.scaled(model, FACTORS), torch.no_grad():
        batched = model(x, attention_mask=mask, position_ids=pos).logits
        alone = [model(s[None]).logits[0] for s in seqs]
    unpatched = model(seqs[-1][None]).logits[0]
    assert maxdiff(alone[-1], unpatched) > 1e-3  # the patch acts
    for b, n in enumerate(LENGTHS):
        d = maxdiff(real(batched, b, n, T, side), alone[b])
        assert d <= 1e-5, f"{family}/{attn}/{side}: example {b} differs from its unbatched run by {d:.3g}"


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("gemma3_text", "eager")])
def test_left_padded_cached_decoding_equals_unbatched(family, attn):
    """Prefill a left-padded batch, then decode two tokens per example with the mask and positions grown."""
    model = tiny(family, attn)
    seqs = examples()
    nxt = ids(batch=len(seqs), length=2, seed=99)  # the tokens to decode
    x, mask, pos = pad_batch(seqs, "left")
    with lr.scaled(model, FACTORS), torch.no_grad():
        out = model(x, attention_mask=mask, position_ids=pos, use_cache=True)
        for step in range(2):
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=mask.dtype)], -1)
            pos = pos[:, -1:] + 1
            out = model(nxt[:, step:step + 1], attention_mask=mask, position_ids=pos,
                        past_key_values=out.past_key_values, use_cache=True)
        for b, s in enumerate(seqs):
            full = model(torch.cat([s, nxt[b]])[None]).logits[0, -1]
            d = maxdiff(out.logits[b, -1], full)
            assert d <= 1e-5, f"{family}/{attn}: example {b} decoded differs by {d:.3g}"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_explicit_position_ids_are_the_ones_scaled(family):
    """Explicit, non-contiguous positions (a gap, a stride) are divided by the factor too: uniform s with
    position_ids p equals the linear rope type with the same p, and differs from positions 0, 1, 2, ..
    (a shift of all positions would not: RoPE only sees differences)."""
    model = tiny(family)
    linear = same_weights(model, with_linear_rope(model.config, 2.5))
    x = ids(batch=2, length=8)
    pos = torch.stack([torch.cat([torch.arange(4), torch.arange(60, 64)]), torch.arange(37, 53, 2)])
    with lr.scaled(model, [2.5] * lr.num_layers(model)), torch.no_grad():
        got = model(x, position_ids=pos).logits
        from_zero = model(x).logits
    want = linear(x, position_ids=pos).logits
    assert torch.equal(got, want), f"max abs diff {maxdiff(got, want):.3g}"
    assert maxdiff(got, from_zero) > 1e-3
