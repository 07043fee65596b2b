"""GGUF checkpoints (llama.cpp's format): metadata -> ModelConfig, tensors -> device weights.

The ``gguf`` package (llama.cpp's own Python reader) parses the file and memory-maps its
tensors; its ``dequantize`` unpacks quantized blocks. Supported tensor types: F32, F16, BF16,
Q4_0, Q4_1, Q8_0 (any other is refused, naming the type and the tensor, before any is read).

Names map to ours (``models.weights``): ``token_embd`` -> ``embed``, ``blk.L.attn_q`` ->
``layers.L.q``, ``ffn_norm`` -> ``mlp_norm``, ``output`` -> ``lm_head`` (absent: tied), and so on.
Matrices are [out, in] as in Hugging Face files: GGUF lists dimensions innermost first, so its
shape [in, out] read row-major is that same [out, in] array.

llama.cpp's converter permutes the rows of a Llama's Q and K projections, within each head,
from Hugging Face's rotate-half order (pair i = rows i and i + d/2) to interleaved pairs
(rows 2i, 2i + 1), which its RoPE kernel expects (``LlamaModel.permute`` in llama.cpp's
``convert_hf_to_gguf.py``). ``unpermute_qk`` undoes it. Qwen2 files are written unpermuted.

Each tensor takes one host pass: float tensors are read from the map, quantized ones are
dequantized to float32; then one upload (``weights.to_device``), and on the device the Q/K
row order is restored and the compute dtype applied.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, dequantize

from pagemem.models.config import ModelConfig, RopeScaling, rope_inv_freq
from pagemem.models.tokenizer import Tokenizer, gguf_tokenizer
from pagemem.models.weights import tensor_specs, to_device

Array = Any
_T = GGMLQuantizationType
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q8_0)
ARCHITECTURES = {"llama": True, "qwen2": False}   # general.architecture -> Q/K rows permuted on disk
_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}   # general.file_type of unquantized files
_LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                "ffn_norm": "mlp_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
_TOP_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"   # Llama 3.x files: the RoPE scaling as one tensor


def load_gguf(path: str | Path, dtype, xp) -> tuple[ModelConfig, dict[str, Array], Tokenizer]:
    """(config, weights as ``xp`` arrays of ``dtype``, tokenizer) of the GGUF file at ``path``."""
    reader = open_gguf(path)
    meta = metadata(reader)
    config = config_from_gguf(meta, {t.name for t in reader.tensors}, path)
    weights = load_gguf_weights(reader, config, dtype, xp, path)
    return config, weights, gguf_tokenizer(meta, config.vocab_size, path)


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader over ``path`` (memory-mapped, read-only). ValueError naming the file when it is
    not a GGUF file or is cut short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError) as e:   # what the reader raises on short reads
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes): {e}") from None


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value of the file as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


class _Fields:
    """Typed access to the metadata, with errors naming the file and the field."""

    def __init__(self, meta: dict[str, Any], path: Path) -> None:
        self.meta, self.path = meta, path

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        if key not in self.meta:
            if required:
                raise ValueError(f"{self.path}: GGUF field {key!r} is missing")
            return default
        value = self.meta[key]
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{self.path}: GGUF field {key!r} must be a number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{self.path}: GGUF field {key!r} must be a string, got {value!r}")
        return kind(value)


def architecture(meta: dict[str, Any], path: Path) -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = _Fields(meta, path).get("general.architecture", str, required=True)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF field 'general.architecture' is {arch!r}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path: str | Path) -> ModelConfig:
    """ModelConfig from a file's ``<arch>.*`` keys; the tensor list says whether the head is tied
    and whether Q/K/V carry biases."""
    path = Path(path)
    arch = architecture(meta, path)
    f = _Fields(meta, path)
    key = lambda name: f"{arch}.{name}"                                            # noqa: E731
    hidden = f.get(key("embedding_length"), int, required=True)
    heads = f.get(key("attention.head_count"), int, required=True)
    head_dim = f.get(key("attention.key_length"), int, hidden // heads)
    rope_dims = f.get(key("rope.dimension_count"), int, head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{path}: GGUF field {key('rope.dimension_count')!r} is {rope_dims} but heads have "
                         f"{head_dim} dims; partial rotary embeddings are unsupported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = f.get(key("vocab_size"), int, len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise ValueError(f"{path}: neither GGUF field {key('vocab_size')!r} nor 'tokenizer.ggml.tokens' gives the vocabulary size")
    eos = [f.get(f"tokenizer.ggml.{k}_token_id", int) for k in ("eos", "eot", "eom")]
    try:
        return ModelConfig(
            arch=arch, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=f.get(key("feed_forward_length"), int, required=True),
            num_layers=f.get(key("block_count"), int, required=True), num_heads=heads,
            num_kv_heads=f.get(key("attention.head_count_kv"), int, heads), head_dim=head_dim,
            max_position_embeddings=f.get(key("context_length"), int, required=True),
            norm_eps=f.get(key("attention.layer_norm_rms_epsilon"), float, 1e-5),
            rope_theta=f.get(key("rope.freq_base"), float, 10000.0), rope_scaling=_rope_scaling(f, arch),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
            dtype=_FILE_DTYPES.get(f.get("general.file_type", int, 0), "float32"),
            bos_token_id=f.get("tokenizer.ggml.bos_token_id", int),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _rope_scaling(f: _Fields, arch: str) -> RopeScaling:
    kind = f.get(f"{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return RopeScaling()
    if kind != "linear":
        raise ValueError(f"{f.path}: GGUF field '{arch}.rope.scaling.type' is {kind!r}; supported: none, linear")
    return RopeScaling("linear", factor=f.get(f"{arch}.rope.scaling.factor", float, required=True))


# ---- tensors ----------------------------------------------------------------------------------
def gguf_name(ours: str) -> str:
    """Our canonical name -> the GGUF tensor name (``layers.3.q.weight`` -> ``blk.3.attn_q.weight``)."""
    parts = ours.split(".")
    if parts[0] == "layers":
        layer_names = {v: k for k, v in _LAYER_NAMES.items()}
        return ".".join(["blk", parts[1], layer_names[parts[2]], *parts[3:]])
    top = {v: k for k, v in _TOP_NAMES.items()}
    return ".".join([top[parts[0]], *parts[1:]])


def unpermute_qk(w: Array, num_heads: int) -> Array:
    """Rows of a Q or K projection (weight [heads * d, H] or bias [heads * d]) from llama.cpp's
    interleaved RoPE pairs back to Hugging Face's rotate-half order; a new array."""
    rows = w.shape[0]
    per_head = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])   # [heads, d/2, 2, ...]
    return per_head.swapaxes(1, 2).reshape(w.shape)                             # [heads, 2, d/2, ...]


def load_gguf_weights(reader: GGUFReader, config: ModelConfig, dtype, xp, path: str | Path) -> dict[str, Array]:
    """Every tensor the model needs, under our names, as ``xp`` arrays of ``dtype``. Checks names,
    shapes and types of all tensors before reading any; ValueError names the file and tensor."""
    path, dtype = Path(path), np.dtype(dtype)
    by_name = {t.name: t for t in reader.tensors}
    specs = tensor_specs(config)
    wanted = {gguf_name(ours): (ours, spec.shape) for ours, spec in specs.items()}
    _check_tensors(by_name, wanted, config.head_dim, path)
    permuted = ARCHITECTURES[config.arch]
    weights = {}
    for name, (ours, _) in wanted.items():
        arr = to_device(_host_array(by_name[name]), dtype, xp)
        kind = ours.split(".")[-2]
        if permuted and kind in ("q", "k"):
            arr = unpermute_qk(arr, config.num_heads if kind == "q" else config.num_kv_heads)
        weights[ours] = arr.copy() if xp is np and np.may_share_memory(arr, reader.data) else arr
    if ROPE_FREQS in by_name:   # Llama 3 RoPE scaling as per-pair divisors of the frequencies
        freqs = np.asarray(_host_array(by_name[ROPE_FREQS]), dtype=np.float32)              # [d / 2]
        weights["rope.inv_freq"] = xp.asarray(np.asarray(rope_inv_freq(config), dtype=np.float32) / freqs)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    return weights


def _host_array(t) -> np.ndarray:
    """One host view (floats, from the map) or array (dequantized to float32) of a tensor, [out, in]."""
    if t.tensor_type in (_T.F32, _T.F16):
        return t.data
    if t.tensor_type == _T.BF16:   # stored as raw bytes; ml_dtypes gives NumPy the type
        return t.data.view(ml_dtypes.bfloat16).reshape(tuple(reversed(t.shape.tolist())))
    return dequantize(t.data, t.tensor_type)


def _check_tensors(by_name: dict, wanted: dict[str, tuple[str, tuple[int, ...]]], head_dim: int, path: Path) -> None:
    names = ", ".join(t.name for t in SUPPORTED_TYPES)
    optional = {ROPE_FREQS: ("rope.inv_freq", (head_dim // 2,))}
    for name, t in by_name.items():
        if name not in wanted and name not in optional:
            raise ValueError(f"{path}: unexpected tensor {name!r} for this architecture")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has type {t.tensor_type.name}; supported: {names}")
        shape, expected = tuple(reversed(t.shape.tolist())), {**wanted, **optional}[name][1]
        if shape != expected:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)}, expected {list(expected)}")
    for name in wanted:
        if name not in by_name:
            raise ValueError(f"{path}: tensor {name!r} is missing")
