"""Safetensors checkpoints -> a flat dict of device arrays under our canonical names.

Canonical names (``L`` = layer index), every matrix stored [out, in] as nn.Linear keeps it:

    embed.weight [V, H]     pos_embed.weight [P, H] (GPT-2)     norm.weight/.bias     lm_head.weight [V, H]
    layers.L.attn_norm.*    layers.L.q/k/v.* (Llama family)      layers.L.qkv.* (GPT-2, fused [3H, H])
    layers.L.o.*            layers.L.mlp_norm.*                  layers.L.gate/up/down.*

Each tensor is read from the file once into host memory (safetensors for fp32/fp16, an explicit
ml_dtypes.bfloat16 read for bf16, which NumPy lacks), moved to the device with one ``xp.asarray``,
and converted to the compute dtype there. GPT-2's Conv1D weights ([in, out] on disk) become
transposed views, not copies. A tied LM head is the embedding array itself.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from pagemem.models.config import ModelConfig

Array = Any  # numpy.ndarray or cupy.ndarray
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


class TensorSpec(NamedTuple):
    hf_name: str
    shape: tuple[int, ...]  # as stored in the file
    transpose: bool         # GPT-2 Conv1D: [in, out] on disk


class TensorInfo(NamedTuple):
    file: Path
    dtype: str              # safetensors code: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int             # absolute byte offset of the data in ``file``


def tensor_specs(config: ModelConfig, gpt2_prefix: str = "transformer.") -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must hold: canonical name -> (HF name, file shape, transpose)."""
    return _gpt2_specs(config, gpt2_prefix) if config.is_gpt2 else _llama_specs(config)


def _llama_specs(c: ModelConfig) -> dict[str, TensorSpec]:
    H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    specs = {"embed.weight": TensorSpec("model.embed_tokens.weight", (V, H), False),
             "norm.weight": TensorSpec("model.norm.weight", (H,), False)}
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec("lm_head.weight", (V, H), False)
    for L in range(c.num_layers):
        hf, ours = f"model.layers.{L}.", f"layers.{L}."
        mods = {"q": ("self_attn.q_proj", q_dim, H, c.attention_bias),
                "k": ("self_attn.k_proj", kv_dim, H, c.attention_bias),
                "v": ("self_attn.v_proj", kv_dim, H, c.attention_bias),
                "o": ("self_attn.o_proj", H, q_dim, False),
                "gate": ("mlp.gate_proj", I, H, c.mlp_bias), "up": ("mlp.up_proj", I, H, c.mlp_bias),
                "down": ("mlp.down_proj", H, I, c.mlp_bias)}
        for name, (hf_mod, out, inp, bias) in mods.items():
            specs[ours + name + ".weight"] = TensorSpec(hf + hf_mod + ".weight", (out, inp), False)
            if bias:
                specs[ours + name + ".bias"] = TensorSpec(hf + hf_mod + ".bias", (out,), False)
        specs[ours + "attn_norm.weight"] = TensorSpec(hf + "input_layernorm.weight", (H,), False)
        specs[ours + "mlp_norm.weight"] = TensorSpec(hf + "post_attention_layernorm.weight", (H,), False)
    return specs


def _gpt2_specs(c: ModelConfig, p: str) -> dict[str, TensorSpec]:
    H, I = c.hidden_size, c.intermediate_size
    specs = {"embed.weight": TensorSpec(p + "wte.weight", (c.vocab_size, H), False),
             "pos_embed.weight": TensorSpec(p + "wpe.weight", (c.max_position_embeddings, H), False),
             "norm.weight": TensorSpec(p + "ln_f.weight", (H,), False),
             "norm.bias": TensorSpec(p + "ln_f.bias", (H,), False)}
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec("lm_head.weight", (c.vocab_size, H), False)
    for L in range(c.num_layers):
        hf, ours = f"{p}h.{L}.", f"layers.{L}."
        for name, hf_mod, inp, out in (("qkv", "attn.c_attn", H, 3 * H), ("o", "attn.c_proj", H, H),
                                       ("up", "mlp.c_fc", H, I), ("down", "mlp.c_proj", I, H)):
            specs[ours + name + ".weight"] = TensorSpec(hf + hf_mod + ".weight", (inp, out), True)
            specs[ours + name + ".bias"] = TensorSpec(hf + hf_mod + ".bias", (out,), False)
        for name, hf_mod in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for kind in ("weight", "bias"):
                specs[f"{ours}{name}.{kind}"] = TensorSpec(f"{hf}{hf_mod}.{kind}", (H,), False)
    return specs


# ---- reading the files ------------------------------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            doc = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: invalid JSON ({e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' of tensor names to file names")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check every tensor's bytes are inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    infos = {}
    for name, meta in header.items():
        start, end, dtype, shape = _entry(meta, name, file)
        if 8 + n + end > size:
            raise ValueError(f"{file}: truncated: tensor {name!r} needs bytes up to {8 + n + end}, "
                             f"the file has {size}")
        infos[name] = TensorInfo(file, dtype, shape, 8 + n + start)
    return infos


def _entry(meta, name: str, file: Path) -> tuple[int, int, str, tuple[int, ...]]:
    """(start, end, dtype, shape) of one header entry: offsets 0 <= start <= end, a dtype name, a
    shape of ints >= 0 whose size (in a known dtype) fills end - start bytes exactly."""
    bad = ValueError(f"{file}: corrupt safetensors header entry for tensor {name!r}: {meta!r}")
    try:
        (start, end), dtype, shape = meta["data_offsets"], meta["dtype"], tuple(meta["shape"])
    except (KeyError, TypeError, ValueError):
        raise bad from None
    ints = (start, end, *shape)
    if not isinstance(dtype, str) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints) \
            or start > end:
        raise bad
    itemsize = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
    if itemsize is not None and math.prod(shape) * itemsize != end - start:
        raise ValueError(f"{file}: tensor {name!r} of shape {list(shape)} {dtype} holds "
                         f"{math.prod(shape) * itemsize} bytes, its offsets give {end - start}")
    return start, end, dtype, shape


def read_tensor(info: TensorInfo, name: str, handle=None) -> np.ndarray:
    """One host copy of tensor ``name``. bf16 is read explicitly as ml_dtypes.bfloat16."""
    if info.dtype not in _ST_DTYPES:
        raise ValueError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; "
                         f"supported: {', '.join(_ST_DTYPES)}")
    if info.dtype == "BF16":  # safetensors' NumPy loader does not know bfloat16
        count = int(np.prod(info.shape, dtype=np.int64))
        return np.fromfile(info.file, dtype=ml_dtypes.bfloat16, count=count, offset=info.offset).reshape(info.shape)
    return handle.get_tensor(name)


def to_device(host: np.ndarray, dtype: np.dtype, xp) -> Array:
    """Move to the device once, then convert there (bf16 through its bits: bf16 = float32's top half)."""
    if host.dtype == ml_dtypes.bfloat16 and dtype != host.dtype:
        bits = xp.asarray(host.view(np.uint16))                           # one upload, 2 bytes per value
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return xp.asarray(host).astype(dtype, copy=False)


# ---- loading -----------------------------------------------------------------------------------
def load_weights(path: str | Path, config: ModelConfig, dtype, xp=np) -> dict[str, Array]:
    """Load and check every tensor of the checkpoint at ``path`` into ``xp`` arrays of ``dtype``.

    Raises ValueError naming the tensor and file for a missing, unexpected, mis-shaped or
    truncated tensor.
    """
    path, dtype = Path(path), np.dtype(dtype)
    infos = _index_tensors(checkpoint_files(path))
    prefix = "" if config.is_gpt2 and "wte.weight" in infos else "transformer."
    specs = tensor_specs(config, prefix)
    _check_names(specs, infos, path, config)
    by_file: dict[Path, list[str]] = {}
    for ours, spec in specs.items():
        by_file.setdefault(infos[spec.hf_name].file, []).append(ours)
    weights = {}
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as handle:
            for ours in names:
                spec = specs[ours]
                arr = to_device(read_tensor(infos[spec.hf_name], spec.hf_name, handle), dtype, xp)
                weights[ours] = arr.T if spec.transpose else arr
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    return weights


def _index_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in infos:
                raise ValueError(f"tensor {name!r} is in both {infos[name].file} and {file}")
            infos[name] = info
    return infos


def _check_names(specs: dict[str, TensorSpec], infos: dict[str, TensorInfo], path: Path,
                 config: ModelConfig) -> None:
    wanted = {s.hf_name: s for s in specs.values()}
    for spec in specs.values():
        info = infos.get(spec.hf_name)
        if info is None:
            files = sorted({i.file.name for i in infos.values()})
            raise ValueError(f"{path}: tensor {spec.hf_name!r} is missing from the checkpoint "
                             f"(files: {', '.join(files)})")
        if info.shape != spec.shape:
            raise ValueError(f"{info.file}: tensor {spec.hf_name!r} has shape {list(info.shape)}, "
                             f"expected {list(spec.shape)}")
    for name, info in infos.items():
        tied_head = config.tie_word_embeddings and name.endswith("lm_head.weight")
        if name not in wanted and not tied_head and not name.endswith(_IGNORED_SUFFIXES):
            raise ValueError(f"{info.file}: unexpected tensor {name!r} for a {config.arch} model")
