import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_llama_config(num_layers=4, **kw):
    """A tiny random-weight Llama config: no downloads, milliseconds per forward."""
    from transformers import LlamaConfig

    base = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed=0, **kw):
    """(model, config) with weights drawn from `seed`; same seed and shapes -> same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
    return model


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (float32, SDPA); ~0.3 s after the first, cached, load."""
    import harness

    try:
        harness.embedded_model_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    return harness.load_model()
