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
        hf = _read_json(file)
        try:
            config = cls.from_dict(hf)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{file}: {e}") from None
        gen = file.parent / "generation_config.json"
        if gen.is_file():
            gen_cfg = _read_json(gen)
            try:
                extra = _ids(gen_cfg.get("eos_token_id") if isinstance(gen_cfg, dict) else None, "eos_token_id")
            except (TypeError, ValueError) as e:
                raise type(e)(f"{gen}: {e}") from None
            eos = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
            config = dataclasses.replace(config, eos_token_ids=eos)
        return config

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dictionary. A missing or mistyped field is a ValueError or TypeError
        naming it as config.json spells it."""
        if not isinstance(hf, dict):
            raise TypeError(f"a config must be a JSON object, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise TypeError(f"'architectures' must be a list of model class names, got {archs!r}")
        supported = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if not archs and hf.get("model_type") in ARCHITECTURES.values():  # a bare config, no model class
            supported = [hf["model_type"]]
        if not supported:
            raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        arch = supported[0]
        fields = _gpt2_fields(hf) if arch == "gpt2" else _llama_fields(hf, arch)
        bos = hf.get("bos_token_id")
        if bos is not None:
            bos = _int(hf, "bos_token_id", minimum=0)
        return cls(arch=arch, dtype=_dtype(hf), bos_token_id=bos,
                   eos_token_ids=_ids(hf.get("eos_token_id"), "eos_token_id"), **fields)


_REQUIRED = object()


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def _int(hf: dict, key: str, default=_REQUIRED, minimum: int = 1) -> int:
    """hf[key] as an int >= minimum (``default`` when absent or null); the error names the key."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"field {key!r} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"field {key!r} must be >= {minimum}, got {value}")
    return value


def _float(value, key: str) -> float:
    """A config float (a JSON number); NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"field {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"field {key!r} must be finite, got {value!r}")
    return float(value)


def _ids(value, key: str) -> tuple[int, ...]:
    """An id or a list of ids (``eos_token_id``) as a tuple of ints >= 0."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"field {key!r} must be an int or a list of ints, got {value!r}")
        if v < 0:
            raise ValueError(f"field {key!r} must hold ids >= 0, got {v}")
    return tuple(values)


def _dtype(hf: dict) -> str:
    value = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")


def _gpt2_fields(hf: dict) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are unsupported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {hf['activation_function']!r} is unsupported")
    hidden, heads = _int(hf, "n_embd"), _int(hf, "n_head")
    if hidden % heads:
        raise ValueError(f"n_embd={hidden} is not a multiple of n_head={heads}")
    return dict(
        vocab_size=_int(hf, "vocab_size"), hidden_size=hidden, intermediate_size=_int(hf, "n_inner", 4 * hidden),
        num_layers=_int(hf, "n_layer"), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=_int(hf, "n_positions"),
        norm_eps=_float(hf.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
    )


def _llama_fields(hf: dict, arch: str) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is unsupported (only silu)")
    hidden, heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    theta, scaling = _rope(hf)
    window, layers = _sliding(hf, arch)
    return dict(
        vocab_size=_int(hf, "vocab_size"), hidden_size=hidden, intermediate_size=_int(hf, "intermediate_size"),
        num_layers=_int(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", heads), head_dim=_int(hf, "head_dim", hidden // heads),
        max_position_embeddings=_int(hf, "max_position_embeddings", 2048),
        norm_eps=_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=_bool(hf, "tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or _bool(hf, "attention_bias", False),
        mlp_bias=_bool(hf, "mlp_bias", False), sliding_window=window, sliding_layers=layers,
    )


def _bool(hf: dict, key: str, default: bool) -> bool:
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"field {key!r} must be true or false, got {value!r}")
    return value


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    """(theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = {}
    for key in ("rope_parameters", "rope_scaling"):
        part = hf.get(key) or {}
        if not isinstance(part, dict):
            raise TypeError(f"field {key!r} must be an object, got {part!r}")
        params.update(part)
    theta = _float(params.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is unsupported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in params:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    kwargs = {k: _float(params[k], k) for k in ("factor", "low_freq_factor", "high_freq_factor") if k in params}
    if "original_max_position_embeddings" in params:
        kwargs["original_max_position_embeddings"] = _int(params, "original_max_position_embeddings")
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _sliding(hf: dict, arch: str) -> tuple[int | None, tuple[bool, ...]]:
    """Mistral slides on every layer; Qwen2 only with use_sliding_window, on its ``layer_types``
    (5.x) or on layers >= max_window_layers (4.x)."""
    if hf.get("sliding_window") is None or arch == "llama" or \
            (arch == "qwen2" and not _bool(hf, "use_sliding_window", False)):
        return None, ()
    window = _int(hf, "sliding_window")
    types = hf.get("layer_types")
    if types:
        if not isinstance(types, list):
            raise TypeError(f"field 'layer_types' must be a list, got {types!r}")
        return window, tuple(t == "sliding_attention" for t in types)
    if arch == "qwen2":
        first = _int(hf, "max_window_layers", 0, minimum=0)
        return window, tuple(i >= first for i in range(_int(hf, "num_hidden_layers")))
    return window, ()


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
