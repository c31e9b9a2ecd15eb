"""
layer_rope_vllm: serve layer_rope's per-layer RoPE factors with vLLM.

The factors come from the model config's `layer_rope_factors` (written by `layer_rope.save_pretrained`, or
given as `hf_overrides={"layer_rope_factors": [...]}`). vLLM builds each attention layer's rotary module
with `get_rope`; once the model is built, this plugin swaps the module of decoder layer l for vLLM's own
linear-scaling RoPE with factor s_l (positions m -> m / s_l, the same cos/sin cache formula), which is
what `layer_rope.apply` does in transformers. A factor of 1.0 keeps the layer's module.

Scope: models whose decoder layers each hold one plain rotary module (`rotary_emb`, vLLM's RotaryEmbedding,
i.e. rope_type "default"), per layer, as vLLM builds them for Llama (and Mistral, Qwen2, Qwen3, Gemma 3 with
its per-layer-type theta; only Llama and Gemma 3 were run here). Everything else is refused with an error
naming what is wrong: another rope type (llama3, YaRN, linear, M-RoPE, ...), rotary modules outside the
decoder layers, a layer without one, a factor list of the wrong length or with a bad value, pipeline
parallelism (not checked here). Nothing is ever skipped silently.

Registered through the `vllm.general_plugins` entry point (vllm_plugin/pyproject.toml): vLLM loads it in
every process it starts, the spawned CPU workers included. The method file layer_rope.py never imports vLLM.
"""

from __future__ import annotations

import functools
import math
import numbers
import re

CONFIG_KEY = "layer_rope_factors"  # = layer_rope.CONFIG_KEY (this file works without layer_rope installed)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def config_factors(model_config):
    """The factors in a vLLM ModelConfig's HF config (top level, else its text config), checked, or None."""
    for config in (model_config.hf_config, model_config.hf_text_config):
        factors = getattr(config, CONFIG_KEY, None)
        if factors is not None:
            return check_factors(factors, model_config.hf_text_config.num_hidden_layers)
    return None


def check_factors(factors, num_layers: int) -> list[float]:
    """factors as floats, or ValueError/TypeError naming what is wrong (as layer_rope.check_factors)."""
    if isinstance(factors, (str, bytes, dict)) or not isinstance(factors, (list, tuple)):
        raise TypeError(f"{CONFIG_KEY} must be a list of numbers, got {type(factors).__name__}")
    out = []
    for i, f in enumerate(factors):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(f"{CONFIG_KEY}[{i}] is not a real number: {f!r}")
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"{CONFIG_KEY}[{i}] must be a finite positive number, got {f}")
        out.append(float(f))
    if len(out) != num_layers:
        raise ValueError(f"{CONFIG_KEY} has {len(out)} factors for a model with {num_layers} decoder layers")
    return out


def layer_rotaries(model) -> dict:
    """{layer index: module whose `rotary_emb` that layer uses}, or TypeError for a model this cannot patch."""
    found = {}
    for name, module in model.named_modules():
        if not hasattr(module, "rotary_emb"):
            continue
        m = _LAYER.search(name + ".")
        if m is None:
            raise TypeError(f"layer_rope: the rotary module of `{name or type(model).__name__}` is not inside a "
                            "decoder layer (`layers.N`); this plugin patches per-layer rotary modules only")
        idx = int(m.group(1))
        if idx in found:
            raise TypeError(f"layer_rope: decoder layer {idx} has more than one rotary module "
                            f"({found[idx][0]}, {name}); cannot tell which to scale")
        found[idx] = (name, module)
    return {i: module for i, (_, module) in found.items()}


def apply_factors(model, factors: list[float]) -> int:
    """Give decoder layer l of a built vLLM model linear-scaled RoPE with factor factors[l]. Returns how many
    layers changed. Checks every layer before changing any."""
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import LinearScalingRotaryEmbedding

    rotaries = layer_rotaries(model)
    missing = sorted(set(range(len(factors))) - set(rotaries))
    if missing:
        raise TypeError(f"layer_rope: {type(model).__name__} has no per-layer rotary module (`rotary_emb`) in "
                        f"decoder layer(s) {missing}; this plugin cannot patch it")
    extra = sorted(set(rotaries) - set(range(len(factors))))
    if extra:
        raise TypeError(f"layer_rope: {type(model).__name__} has rotary modules in layers {extra}, beyond the "
                        f"{len(factors)} factors")
    for idx, module in rotaries.items():
        if type(module.rotary_emb) is not RotaryEmbedding:  # exactly: every subclass is another rope type
            raise TypeError(f"layer_rope: decoder layer {idx} of {type(model).__name__} uses "
                            f"{type(module.rotary_emb).__name__}; this plugin scales plain RoPE (rope_type "
                            "'default') only, so it refuses rather than serve different positions")
    made = {}  # vLLM's get_rope shares one module among layers with equal settings; so do we
    for idx, module in sorted(rotaries.items()):
        rope, factor = module.rotary_emb, factors[idx]
        if factor == 1.0:
            continue
        key = (id(rope), factor)
        if key not in made:
            made[key] = LinearScalingRotaryEmbedding(rope.head_size, rope.rotary_dim, rope.max_position_embeddings,
                                                     rope.base, rope.is_neox_style, factor, rope.dtype)
        module.rotary_emb = made[key]
    return sum(f != 1.0 for f in factors)


def register() -> None:
    """The `vllm.general_plugins` entry point: wrap vLLM's model creation so that a model whose config carries
    `layer_rope_factors` is built with them. Idempotent (vLLM may load plugins more than once)."""
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader.create_model, "_layer_rope", False):
        return
    logger = init_logger("vllm.layer_rope")  # under vLLM's logger, so its handlers print our line
    create_model = BaseModelLoader.create_model

    @functools.wraps(create_model)
    def create_model_with_factors(self, vllm_config, model_config, prefix: str = ""):
        model = create_model(self, vllm_config, model_config, prefix=prefix)
        factors = config_factors(model_config)
        if factors is None:
            return model
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError("layer_rope: pipeline parallelism is not supported by this plugin")
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(vllm_config):  # vLLM's rotary modules read it when built
            changed = apply_factors(model, factors)
        logger.info("layer_rope: per-layer RoPE factors applied to %d of %d layers of %s", changed, len(factors),
                    type(model).__name__)
        return model

    create_model_with_factors._layer_rope = True
    BaseModelLoader.create_model = create_model_with_factors
