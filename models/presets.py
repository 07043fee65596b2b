"""``random:<preset>``: random weights with the shapes of real models, generated on the device.

Presets are config.json dictionaries, parsed by the same ``ModelConfig.from_dict`` as a
checkpoint. ``tiny`` is ours: a two-layer Llama over a byte vocabulary that runs in
milliseconds on a laptop CPU.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pagemem.models.config import ModelConfig
from pagemem.models.weights import tensor_specs

Array = Any
_CHUNK_VALUES = 1 << 24   # float32 scratch per draw: 64 MiB

_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5}
PRESETS: dict[str, dict] = {
    "tiny": {**_LLAMA, "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True,
             "bos_token_id": 256, "eos_token_id": 257},
    "llama-3.2-1b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001},
    "llama-3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
                   "bos_token_id": 128000, "eos_token_id": 128001},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
                   "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096,
                   "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2.5-0.5b": {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
                     "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                     "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new", "vocab_size": 50257,
             "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "layer_norm_epsilon": 1e-5,
             "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256},
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of ``random:<name>``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name])


def random_weights(config: ModelConfig, dtype, xp=np, seed: int = 0) -> dict[str, Array]:
    """Weights of ``config`` drawn on the device from ``seed``, one tensor at a time.

    Matrices are N(0, 1/fan_in), so each projection keeps unit-scale activations; the two
    projections that write into the residual stream (o, down) get a further 1/sqrt(2 * layers)
    (GPT-2's scheme), so the stream stays O(1) through depth. Norm weights are 1, biases 0.
    """
    dtype = np.dtype(dtype)
    rng = xp.random.default_rng(seed)
    residual_scale = 1.0 / math.sqrt(2 * config.num_layers)
    weights = {}
    for name, spec in tensor_specs(config).items():
        shape = spec.shape[::-1] if spec.transpose else spec.shape      # canonical [out, in]
        weights[name] = _draw(name, shape, dtype, xp, rng, residual_scale)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    return weights


def _draw(name: str, shape: tuple[int, ...], dtype, xp, rng, residual_scale: float) -> Array:
    if name.endswith("norm.weight"):
        return xp.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return xp.zeros(shape, dtype=dtype)
    std = 1.0 / math.sqrt(shape[-1])
    if name.endswith(("o.weight", "down.weight")):
        std *= residual_scale
    out = xp.empty(shape, dtype=dtype)
    rows = max(1, _CHUNK_VALUES // shape[-1])
    for start in range(0, shape[0], rows):   # chunks bound the float32 scratch (the RNGs' narrowest type)
        x = rng.standard_normal((min(rows, shape[0] - start), *shape[1:]), dtype=np.float32)
        x *= std
        out[start:start + rows] = x
    return out
