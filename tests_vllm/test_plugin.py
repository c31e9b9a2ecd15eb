"""The plugin's checks and its swap on small module trees shaped like vLLM's models (no engine, seconds)."""

import importlib.metadata

import pytest
import torch

import layer_rope as lr
import layer_rope_vllm as plugin

HEAD, MAXPOS = 64, 1024


@pytest.fixture(autouse=True)
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # vLLM's rotary modules read it when built
        yield


def rope(rope_type="default", base=10000.0):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = {"rope_type": rope_type, "rope_theta": base}
    if rope_type == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256)
    if rope_type == "linear":
        params.update(factor=2.0)
    return get_rope(HEAD, MAXPOS, True, params)


class Attention(torch.nn.Module):
    def __init__(self, rotary):
        super().__init__()
        if rotary is not None:
            self.rotary_emb = rotary


class Layer(torch.nn.Module):
    def __init__(self, rotary):
        super().__init__()
        self.self_attn = Attention(rotary)


class Model(torch.nn.Module):
    """model.layers.N.self_attn.rotary_emb, as vLLM's LlamaForCausalLM names them."""

    def __init__(self, rotaries):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Layer(r) for r in rotaries)


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "layer_rope" and ep.value == "layer_rope_vllm:register" for ep in eps)


def test_register_is_idempotent():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    plugin.register()  # vLLM already did, at import of the entry point group in this process or now
    first = BaseModelLoader.create_model
    plugin.register()
    assert BaseModelLoader.create_model is first and first._layer_rope


def test_swap_gives_each_layer_its_factor_and_the_method_cos_sin():
    shared = rope()  # get_rope shares one module among layers with equal settings
    model = Model([shared] * 4)
    factors = [1.0, 2.0, 2.0, 3.5]
    assert plugin.apply_factors(model, factors) == 3
    ropes = [layer.self_attn.rotary_emb for layer in model.model.layers]
    assert ropes[0] is shared and ropes[1] is ropes[2] and ropes[3] is not ropes[1]
    positions = torch.arange(512)
    inv_freq = lr.rope_inv_freq(HEAD, 10000.0)
    for r, s in zip(ropes[1:], factors[1:]):
        assert type(r).__name__ == "LinearScalingRotaryEmbedding" and r.scaling_factors == [s]
        cos, sin = lr.rope_cos_sin(positions, inv_freq, s)  # layer_rope's positions m / s
        got_cos, got_sin = r.cos_sin_cache[:512].chunk(2, dim=-1)
        torch.testing.assert_close(got_cos, cos[:, :HEAD // 2], atol=2e-5, rtol=0)
        torch.testing.assert_close(got_sin, sin[:, :HEAD // 2], atol=2e-5, rtol=0)


def test_per_layer_theta_is_kept():
    """Gemma 3's layout: sliding layers with theta 1e4, global ones with 1e6; each keeps its own."""
    local, glob = rope(base=1e4), rope(base=1e6)
    model = Model([local, local, glob])
    plugin.apply_factors(model, [2.0, 1.0, 2.0])
    assert [layer.self_attn.rotary_emb.base for layer in model.model.layers] == [1e4, 1e4, 1e6]


@pytest.mark.parametrize("rope_type", ["llama3", "linear"])
def test_other_rope_types_are_refused_untouched(rope_type):
    other = rope(rope_type)
    model = Model([rope(), other])
    with pytest.raises(TypeError, match=f"decoder layer 1 of Model uses {type(other).__name__}"):
        plugin.apply_factors(model, [2.0, 2.0])
    assert type(model.model.layers[0].self_attn.rotary_emb).__name__ == "RotaryEmbedding"  # checked before changed


def test_a_layer_without_rotary_is_refused():
    with pytest.raises(TypeError, match=r"no per-layer rotary module \(`rotary_emb`\) in decoder layer\(s\) \[1\]"):
        plugin.apply_factors(Model([rope(), None]), [2.0, 2.0])


def test_a_model_level_rotary_is_refused():
    model = Model([None, None])
    model.model.rotary_emb = rope()
    with pytest.raises(TypeError, match="is not inside a decoder layer"):
        plugin.apply_factors(model, [2.0, 2.0])


@pytest.mark.parametrize("factors, error, message", [
    ([2.0] * 3, ValueError, "has 3 factors for a model with 4 decoder layers"),
    ([2.0, 2.0, 0.0, 1.0], ValueError, r"layer_rope_factors\[2\] must be a finite positive number"),
    ([2.0, 2.0, float("nan"), 1.0], ValueError, r"layer_rope_factors\[2\] must be a finite positive number"),
    ([2.0, True, 1.0, 1.0], TypeError, r"layer_rope_factors\[1\] is not a real number"),
    ("2.0", TypeError, "must be a list of numbers"),
])
def test_bad_factor_lists_are_refused(factors, error, message):
    with pytest.raises(error, match=message):
        plugin.check_factors(factors, 4)
