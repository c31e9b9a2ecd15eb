"""The one-folder artifact: save_pretrained writes the factors into config.json, and from_pretrained + apply()
restores the scaled model bit for bit (issue 37)."""

import json

import numpy as np
import pytest
import torch

import layer_rope as lr
from conftest import tiny_llama


def per_layer_factors(n):
    return [float(f) for f in np.linspace(1.0, 3.5, n)]


def test_embedded_model_round_trip_is_bitwise(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    factors = per_layer_factors(lr.num_layers(model))
    lr.save_pretrained(model, tmp_path, factors, tokenizer=tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())[lr.CONFIG_KEY] == factors
    assert not hasattr(model.config, lr.CONFIG_KEY)  # the live model's config is left as it was

    ids = tokenizer("The grass is green. " * 60, return_tensors="pt").input_ids  # > 512 tokens: factors matter
    with torch.no_grad():
        with lr.scaled(model, factors):
            expected = model(ids).logits
        plain = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert reloaded.config.layer_rope_factors == factors
        handle = lr.apply(reloaded)
        got = reloaded(ids).logits
    assert handle.factors == factors
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the factors did change the output, so the equality above means something


def test_apply_without_factors_refuses_a_plain_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layer_rope_factors"):
        lr.apply(model)
    assert not hasattr(model, "_layer_rope_handle")


def test_config_factors_are_checked(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(num_layers=4)
    with pytest.raises(ValueError, match="3 factors for a model with 4 decoder layers"):
        lr.save_pretrained(model, tmp_path / "bad", [1.0, 2.0, 3.0])
    assert not (tmp_path / "bad").exists()
    lr.save_pretrained(model, tmp_path / "ok", [1.0, 2.0, 3.0, 4.0])
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config[lr.CONFIG_KEY] = [1.0, 2.0, 0.0, 4.0]  # a hand-edited config
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="factor 2 must be positive"):
        lr.apply(LlamaForCausalLM.from_pretrained(tmp_path / "ok"))


def test_explicit_factors_win_over_the_config(tmp_path):
    from transformers import LlamaForCausalLM

    lr.save_pretrained(tiny_llama(num_layers=4), tmp_path, [2.0] * 4)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert lr.apply(model, [1.0, 1.5, 1.5, 1.0]).factors == [1.0, 1.5, 1.5, 1.0]
