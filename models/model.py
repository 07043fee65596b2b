"""Model: a loaded checkpoint (config, device weights, tokenizer) and ``load_model`` to build one."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pagemem.models.config import ModelConfig
from pagemem.models.presets import preset_config, random_weights
from pagemem.models.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from pagemem.models.transformer import forward, fuse_projections, matmul_t, rope_buffer
from pagemem.models.weights import load_weights
from pagemem import PagedBatch, PagePool, PoolConfig
from pagemem.backend import array_module, resolve_device, to_dtype
from pagemem.config import check_int

Array = Any
RANDOM_PREFIX = "random:"


@dataclass(slots=True)
class Model:
    """A model ready to run: ``weights`` are ``xp`` arrays of ``dtype`` on ``device``.
    Holds no per-step state: each forward gets its batch and pool as arguments."""

    config: ModelConfig
    weights: dict[str, Array] = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    device: str
    dtype: np.dtype
    name: str = ""

    @property
    def xp(self) -> ModuleType:
        return array_module(self.device)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids or tuple(self.tokenizer.eos_token_ids)

    def forward(self, token_ids: Array, positions: Array, batch: PagedBatch, pool: PagePool, *,
                all_logits: bool = False, mm=matmul_t, out=None) -> Array:
        """Logits [num_seqs, V] float32 of each sequence's last new token ([T, V] with all_logits),
        written into ``out`` if given. Writes the new tokens' K/V into ``pool``; see
        ``models.transformer.forward``."""
        return forward(self.config, self.weights, token_ids, positions, batch, pool, all_logits=all_logits,
                       mm=mm, out=out)

    def pool_config(self, num_pages: int, page_size: int = 16, dtype: str | None = None) -> PoolConfig:
        """A PoolConfig matching this model's layers, K/V heads, head_dim, dtype and device."""
        c = self.config
        return PoolConfig(num_pages=num_pages, page_size=page_size, num_layers=c.num_layers,
                          num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                          dtype=dtype or self.dtype.name, device=self.device)


def load_model(path_or_random: str | os.PathLike, dtype: str | None = None, device: str = "auto",
               seed: int = 0) -> Model:
    """Load a Hugging Face checkpoint folder, a GGUF file (``*.gguf``), or ``random:<preset>``
    weights drawn from ``seed`` (an int >= 0).

    ``dtype`` defaults to float32 on the CPU and float16 on CUDA; bfloat16 runs on CUDA only
    (NumPy has no bfloat16 arithmetic: its matmul would compute in float32).
    """
    if isinstance(path_or_random, bytes) or not isinstance(path_or_random, (str, os.PathLike)):
        raise TypeError(f"model must be a path (str or Path) or 'random:<preset>', got "
                        f"{type(path_or_random).__name__} {path_or_random!r}")
    seed = check_int(seed, "seed", 0)
    device = resolve_device(device)
    dtype = to_dtype(dtype or ("float16" if device == "cuda" else "float32"))
    if device == "cpu" and dtype == to_dtype("bfloat16"):
        raise ValueError("dtype bfloat16 runs on CUDA only: NumPy has no bfloat16 arithmetic; "
                         "on the CPU use float32 or float16")
    xp = array_module(device)
    name = os.fspath(path_or_random)
    if name.startswith(RANDOM_PREFIX):
        config = preset_config(name[len(RANDOM_PREFIX):])
        weights = random_weights(config, dtype, xp, seed)
        tokenizer: Tokenizer = ByteTokenizer(config.vocab_size)
    else:
        config, weights, tokenizer = _load_checkpoint(Path(name), dtype, xp)
    fuse_projections(config, weights)
    if not config.is_gpt2 and "rope.inv_freq" not in weights:   # a GGUF may bring its own (Llama 3)
        weights["rope.inv_freq"] = rope_buffer(config, xp)
    return Model(config, weights, tokenizer, device, dtype, name)


def _load_checkpoint(path: Path, dtype: np.dtype, xp) -> tuple[ModelConfig, dict[str, Array], Tokenizer]:
    """(config, weights, tokenizer) of a checkpoint folder or a GGUF file."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        from pagemem.models.gguf import load_gguf
        return load_gguf(path, dtype, xp)
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(path)!r} is not a folder, nor a .gguf file, nor 'random:<preset>' "
                                f"(a model is a checkpoint folder, a GGUF file or random weights)")
    config = ModelConfig.from_hf(path)
    weights = load_weights(path, config, dtype, xp)
    return config, weights, load_tokenizer(path, config.vocab_size, config.bos_token_id, config.eos_token_ids)
