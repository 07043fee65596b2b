"""Paged prefill on tensor cores: one fused kernel (flash attention over a page table).

The cuBLAS route of kernels/prefill.py writes every score to memory and reads it back twice; at
thousands of new tokens that traffic, not the arithmetic, sets its time. This kernel keeps the
scores in registers, as FlashAttention-2 does (Dao, 2023): a block owns 128 query rows (by default:
32 tokens x a KV head's 4 query heads, so each K/V tile serves the whole GQA group), streams its
sequence's K/V through shared memory 64 keys at a time (``cp.async``, two buffers: the next tile's
pages load during this tile's math), and each of its 4 warps runs ``mma.sync.m16n8k16`` on its 32
rows with an online softmax in registers. Keys come from the page table a 16-byte chunk at a
time, so pages may sit anywhere in the pool. ``Tiling`` holds the block shape; TILING is the
measured best.

Numba exposes no tensor-core instructions, so this one kernel is CUDA C++ compiled by NVRTC
through CuPy (as the swap's direct copy kernel is); fp16 and bf16 caches with head_dim a multiple
of 16 up to 128 on compute capability 8.0 and newer take it, everything else keeps the cuBLAS
route. It is GPU-only: the simulator runs C++ kernels not at all, so tests/kernels/test_gpu.py
checks it against the NumPy reference on a GPU.

    block (s, tile, kv head): tokens [tile * TB, tile * TB + TB) of sequence s (TB = 128 / group),
    row r = token r / group, query head kv_head * group + r % group, at position pos0 + token
    (pos0 = context_len - query_len); keys [kbeg, pos0 + last token] in tiles of 64; the
    heaviest tiles (the latest tokens, most keys) are launched first.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pagemem.kernels._checks import AttnDims
from pagemem.kernels._device import BF16, F16

HEAD_DIMS = (64, 80, 96, 112, 128)
MIN_CC = 80                    # mma.sync bf16 and cvt.rn.{b}f16x2.f32 need sm_80

_SRC = (Path(__file__).parent / "prefill_flash.cu").read_text()   # CUDA C++ beside this loader


class Tiling(NamedTuple):
    """A block's shape: ``warps`` warps of ``m_tiles`` * 16 rows each; ``block_n`` keys a K/V tile
    in shared memory, scored ``sub_n`` at a time (0: block_n); Q fragments held in registers for
    the whole block (``q_regs``) or reloaded from shared memory (fewer registers); the resident
    blocks an SM asked of ptxas; ``pack``: a block's rows are a KV head's whole query group for
    each of its tokens (K/V read once a group) rather than one query head's tokens; ``stages``
    K/V tiles in shared memory."""
    warps: int = 4
    m_tiles: int = 1
    block_n: int = 64
    q_regs: bool = True
    min_blocks: int = 1
    pack: bool = False
    sub_n: int = 0
    stages: int = 2            # K/V tiles in shared memory (stages - 1 loading during the math)

    @property
    def block_m(self) -> int:
        return 16 * self.m_tiles * self.warps


# Measured on an H100 (bench/bench_attention.py --prefill --tune-prefill, 8 x 2048 new tokens,
# head_dim 128, GQA 4, 2026-11-27 02:30 UTC): 4 warps of 32 rows, packed GQA rows, 64-key tiles
# scored 32 keys at a time (no register spills) took 1174 us; the same with 64-key scoring 1178
# (spills 88 bytes), 32-key tiles 1190, 8 warps of 32 rows 1216, one 16-row tile a warp 1411
# (8 warps, packed) and 1500 (4 warps, per head). torch SDPA took 533 us.
TILING = Tiling(warps=4, m_tiles=2, block_n=64, q_regs=False, min_blocks=1, pack=True, sub_n=32)


def source(head_dim: int, tiling: Tiling, bf16: bool) -> str:
    """The kernel's CUDA source for one (head_dim, tiling, element type)."""
    defs = (f"#define HEAD_DIM {head_dim}\n#define NWARPS {tiling.warps}\n#define MT {tiling.m_tiles}\n"
            f"#define BLOCK_N {tiling.block_n}\n#define Q_REGS {int(tiling.q_regs)}\n#define MINB {tiling.min_blocks}\n"
            f"#define PACK {int(tiling.pack)}\n#define SUB_N {tiling.sub_n or tiling.block_n}\n"
            f"#define STAGES {tiling.stages}\n"
            f"#define ELEM \"{'bf16' if bf16 else 'f16'}\"\n")
    return defs + _SRC


def smem_bytes(head_dim: int, tiling: Tiling) -> int:
    """Dynamic shared memory of a block: the Q tile and ``stages`` K and V tiles, padded rows."""
    return (tiling.block_m + 2 * tiling.stages * tiling.block_n) * (head_dim + 8) * 2


@functools.cache
def _kernel(head_dim: int, tiling: Tiling, bf16: bool, device: int):
    import cupy as cp
    k = cp.RawKernel(source(head_dim, tiling, bf16), "pagemem_flash_prefill", options=("-std=c++17",))
    k.max_dynamic_shared_size_bytes = smem_bytes(head_dim, tiling)
    return k


@functools.cache
def _device_limits(device: int) -> tuple[int, int]:
    """(compute capability as 10 * major + minor, opt-in shared memory per block) of a device."""
    import cupy as cp
    optin = 97   # cudaDevAttrMaxSharedMemoryPerBlockOptin
    return int(cp.cuda.Device(device).compute_capability), cp.cuda.runtime.deviceGetAttribute(optin, device)


def config_supported(dtype, head_dim: int, device: int, tiling: Tiling = TILING) -> bool:
    """Whether caches of ``dtype`` and ``head_dim`` take the fused kernel on CUDA device
    ``device``: fp16 or bf16, head_dim a multiple of 16 up to 128, compute capability 8.0+ and
    the shared memory a block needs."""
    if np.dtype(dtype).itemsize != 2 or head_dim not in HEAD_DIMS:
        return False
    cc, smem = _device_limits(device)
    return cc >= MIN_CC and smem >= smem_bytes(head_dim, tiling)


def supports(q, k_cache, v_cache, out, dims: AttnDims, tiling: Tiling = TILING) -> bool:
    """Whether this call can take the fused kernel: ``config_supported``, q and out of the cache
    dtype, 16-byte aligned rows (cp.async moves 16 bytes)."""
    if dims.cache_kind not in (F16, BF16) or not config_supported(k_cache.dtype, dims.head_dim, q.device.id, tiling):
        return False
    if np.dtype(q.dtype) != np.dtype(k_cache.dtype) or np.dtype(out.dtype) != np.dtype(k_cache.dtype):
        return False
    for x in (q, out):
        if x.strides[2] != 2 or x.strides[0] % 16 or x.strides[1] % 16 or x.data.ptr % 16:
            return False
    if k_cache.data.ptr % 16 or v_cache.data.ptr % 16:
        return False
    return all(st % 16 == 0 for st in k_cache.strides[:3])     # v_cache's equal k_cache's (checked)


def paged_prefill_flash(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale: float,
                        out, window: int, dims: AttnDims, max_query_len: int, tiling: Tiling = TILING):
    """Enqueue the fused kernel on the current CuPy stream (no sync); writes and returns ``out``.
    Preconditions: ``supports(...)``; page ids of each sequence's first context_len tokens valid."""
    import cupy as cp
    pt = page_tables if page_tables.strides[1] == 4 else cp.ascontiguousarray(page_tables)
    lens, qsl = cp.ascontiguousarray(context_lens), cp.ascontiguousarray(query_start_loc)
    if tiling.pack and dims.group > tiling.block_m:   # a token's group would not fit a block
        tiling = tiling._replace(pack=False)
    rows_per_token = dims.group if tiling.pack else 1
    num_tiles = -(-max_query_len // (tiling.block_m // rows_per_token))
    el = 2
    kernel = _kernel(dims.head_dim, tiling, dims.cache_kind == BF16, q.device.id)
    args = (q, np.int64(q.strides[0] // el), np.int64(q.strides[1] // el), k_cache, v_cache,
            np.int64(k_cache.strides[0] // el), np.int64(k_cache.strides[1] // el),
            np.int64(k_cache.strides[2] // el), pt, np.int64(pt.strides[0] // 4), lens, qsl,
            out, np.int64(out.strides[0] // el), np.int64(out.strides[1] // el),
            np.int32(dims.group), np.int32(dims.page_size.bit_length() - 1),
            np.float32(scale * np.log2(np.e)), np.int32(window), np.int32(num_tiles))
    heads = dims.num_kv_heads if tiling.pack else dims.num_q_heads
    kernel((dims.num_seqs * num_tiles, heads, 1), (32 * tiling.warps, 1, 1), args,
           shared_mem=smem_bytes(dims.head_dim, tiling))
    return out
