"""ModelConfig: one validated record for a checkpoint's config.json (Llama, Qwen2, Mistral, GPT-2).

Reads both the transformers 4.x spelling (``rope_theta`` + ``rope_scaling`` with ``type`` or
``rope_type``, ``torch_dtype``) and the 5.x one (``rope_parameters``, ``dtype``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "GPT2LMHeadModel": "gpt2",
}
ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" divides every frequency by ``factor``; "llama3" divides
    only the low frequencies and interpolates the middle band (Llama 3.1/3.2)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope: high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and options of one decoder-only transformer. ``arch`` is llama | qwen2 | mistral | gpt2."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # q/k/v biases (Qwen2: always)
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does sliding_window apply? () = all layers
    dtype: str = "float32"                 # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES.values():
            raise ValueError(f"ModelConfig.arch must be one of {sorted(ARCHITECTURES.values())}, got {self.arch!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ModelConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.arch != "gpt2" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"ModelConfig.sliding_layers has {len(self.sliding_layers)} entries "
                             f"for {self.num_layers} layers")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"ModelConfig: norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be > 0")

    @property
    def is_gpt2(self) -> bool:
        return self.arch == "gpt2"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full attention."""
        if self.sliding_window is None or (self.sliding_layers and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Parse ``path/config.json`` (or ``path`` itself when it is the json file). EOS ids of a
        ``generation_config.json`` beside it are added (Llama 3 instruct lists several there)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from None
        try:
            config = cls.from_dict(hf)
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"{file}: {e}") from None
        gen = file.parent / "generation_config.json"
        if gen.is_file():
            extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
            eos = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            config = dataclasses.replace(config, eos_token_ids=eos)
        return config

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dictionary."""
        archs = hf.get("architectures") or []
        supported = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if not archs and hf.get("model_type") in ARCHITECTURES.values():  # a bare config, no model class
            supported = [hf["model_type"]]
        if not supported:
            raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        arch = supported[0]
        fields = _gpt2_fields(hf) if arch == "gpt2" else _llama_fields(hf, arch)
        return cls(arch=arch, dtype=_dtype(hf), bos_token_id=hf.get("bos_token_id"),
                   eos_token_ids=_ids(hf.get("eos_token_id")), **fields)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _dtype(hf: dict) -> str:
    value = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")


def _gpt2_fields(hf: dict) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are unsupported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {hf['activation_function']!r} is unsupported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    if hidden % heads:
        raise ValueError(f"n_embd={hidden} is not a multiple of n_head={heads}")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
    )


def _llama_fields(hf: dict, arch: str) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is unsupported (only silu)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = _rope(hf)
    window, layers = _sliding(hf, arch)
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window, sliding_layers=layers,
    )


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    """(theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is unsupported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, RopeScaling()
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    kwargs = {k: params[k] for k in keys if k in params}
    if "factor" not in kwargs:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _sliding(hf: dict, arch: str) -> tuple[int | None, tuple[bool, ...]]:
    """Mistral slides on every layer; Qwen2 only with use_sliding_window, on its ``layer_types``
    (5.x) or on layers >= max_window_layers (4.x)."""
    window = hf.get("sliding_window")
    if window is None or (arch == "qwen2" and not hf.get("use_sliding_window", False)):
        return None, ()
    if arch == "llama":
        return None, ()
    types = hf.get("layer_types")
    if types:
        return int(window), tuple(t == "sliding_attention" for t in types)
    if arch == "qwen2":
        first = hf.get("max_window_layers", 0)
        return int(window), tuple(i >= first for i in range(hf["num_hidden_layers"]))
    return int(window), ()


def rope_inv_freq(config: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies [head_dim // 2], as HF computes them (scaling applied)."""
    d = config.head_dim
    inv = [1.0 / config.rope_theta ** (i / d) for i in range(0, d, 2)]
    s = config.rope_scaling
    if s.rope_type == "linear":
        return [f / s.factor for f in inv]
    if s.rope_type == "llama3":
        return [_llama3(f, s) for f in inv]
    return inv


def _llama3(f: float, s: RopeScaling) -> float:
    wavelen = 2 * math.pi / f
    old = s.original_max_position_embeddings
    if wavelen < old / s.high_freq_factor:   # high frequency: kept
        return f
    if wavelen > old / s.low_freq_factor:    # low frequency: scaled
        return f / s.factor
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return (1 - smooth) * f / s.factor + smooth * f
