"""CUDA launcher of paged decode: picks the kernel constants, the split-K partitioning and the
launch config, then enqueues on the caller's stream without synchronizing."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
from numba import float32

from pagemem.kernels._arrays import as_device, as_flat_words, launch, num_sms
from pagemem.kernels._checks import AttnDims
from pagemem.kernels._device import bits_dtype, dtype_kind
from pagemem.kernels.paged_attention import (MAX_REGISTERS, TOKENS_PER_GROUP, choose_lanes, heads_per_block,
                                     make_decode_reduce_kernel, make_paged_decode_kernel)

THREADS = 128
# Split-K launches (few sequences, long contexts) use 256 threads: H100, bench_attention.py,
# 2026-11-26 15:41 UTC, head_dim 128: 8x8192 162.9 vs 184.6 us, 1x32768 110.5 vs 132.2 us; without
# a split 128 stays (256x512: 251.4 vs 280.2 us; 64x2048 244.2 vs 238.7, within noise).
THREADS_SPLIT = 256
MIN_SPLIT_SPAN = 512       # contexts up to this many tokens never split
MIN_PART_TOKENS = 256      # smallest partition worth a block
# Grid order: a sequence's KV heads in neighbouring blocks (see the kernel's docstring). H100,
# 2026-11-26, head_dim 64: 3% less time at 256x512, 2 to 4% at 8x8192 (split); head_dim 128: 8% at
# 8x8192, neutral at 64x2048 and 256x512. grid.y holds at most 65535 sequences; beyond, seq-major.
HEADS_MAJOR = True
MAX_GRID_Y = 65535


def split_rule(num_blocks: int, span: int, page_size: int, sms: int,
               resident: int = 2) -> tuple[int, int]:
    """(num_partitions, partition_tokens) for a grid of ``num_blocks`` (seq, kv-head) blocks over
    contexts of at most ``span`` tokens, ``resident`` blocks fitting on an SM at once.

    No split while the grid gives every SM two blocks or more, or the span is short: a block
    streams its tokens at full rate on its own. Otherwise partitions are added while the grid
    still fits every SM once (one wave: H100, 2026-11-26, 8x8192 at head_dim 128 took 131 us with
    256 blocks against 165 us with 576, two waves), none shorter than 256 tokens, each a whole
    number of pages.
    """
    if num_blocks >= 2 * sms or span <= MIN_SPLIT_SPAN:
        return 1, span
    parts = max(1, min(resident * sms // num_blocks, -(-span // MIN_PART_TOKENS)))
    part_tokens = -(-span // parts)
    part_tokens = -(-part_tokens // page_size) * page_size
    return -(-span // part_tokens), part_tokens


@functools.cache
def _dummy(xp):
    return xp.zeros((1, 1, 1, 2), dtype=np.float32)


def paged_decode_cuda(q, k_cache, v_cache, page_tables, context_lens, scale: float, out, stream,
                      window: int, dims: AttnDims, num_partitions: int | None = None,
                      threads: int | None = None, lanes: int | None = None,
                      tokens_per_group: int = TOKENS_PER_GROUP, max_registers: int | None = MAX_REGISTERS,
                      heads_major: bool | None = None):
    """Enqueue decode attention; ``out`` [num_seqs, num_q_heads, head_dim] is written, returned.
    Tuning overrides (tests and bench): ``num_partitions`` replaces split_rule, ``threads`` is the
    block size (a multiple of 32), ``lanes`` the lanes per token, ``tokens_per_group`` the tokens
    each lane group loads per step, ``max_registers`` the ptxas cap (None: uncapped),
    ``heads_major`` the grid order (None: KV heads fastest whenever num_seqs fits grid.y)."""
    if isinstance(q, np.ndarray):
        xp = np
    else:
        import cupy as xp
    heads = heads_per_block(dims.group)
    lanes = lanes or choose_lanes(dims.head_dim, heads, dims.cache_kind)
    span = page_tables.shape[1] * dims.page_size
    span = min(span, window) if window else span
    num_blocks = dims.num_seqs * dims.num_kv_heads * (dims.group // heads)
    if num_partitions is None:
        resident = max(1, 65536 // ((threads or THREADS_SPLIT) * (max_registers or 255)))  # register file
        parts, part_tokens = split_rule(num_blocks, span, dims.page_size, num_sms(), resident)
    else:
        parts, part_tokens = num_partitions, -(-span // num_partitions)
    threads = threads or (THREADS_SPLIT if parts > 1 else THREADS)
    out_kind = dtype_kind(out.dtype, "out")
    if heads_major is None:
        heads_major = HEADS_MAJOR and dims.num_seqs <= MAX_GRID_Y
    kernel = make_paged_decode_kernel(dims.head_dim, dims.page_size, dims.group, heads, dims.cache_kind,
                                      dims.q_kind, out_kind, parts > 1, lanes, threads, tokens_per_group,
                                      max_registers, bool(heads_major))
    ctx = stream if stream is not None and xp is not np else contextlib.nullcontext()
    with ctx:  # temporaries come from the pool arena of the launch stream
        part_out, part_ml = _partials(xp, dims, parts)
    out_b = as_device(out, bits_dtype(out_kind))
    head_blocks = dims.num_kv_heads * (dims.group // heads)
    grid = (head_blocks, dims.num_seqs, parts) if heads_major else (dims.num_seqs, head_blocks, parts)
    (k_flat, strides), (v_flat, _) = as_flat_words(k_cache), as_flat_words(v_cache)  # same strides
    launch(kernel, grid, threads, stream, out_b, as_device(part_out), as_device(part_ml),
           as_device(q, bits_dtype(dims.q_kind)), k_flat, v_flat, as_device(page_tables),
           as_device(context_lens), float32(scale), window, part_tokens, *strides)
    if parts > 1:
        reduce = make_decode_reduce_kernel(dims.head_dim, out_kind)
        launch(reduce, (dims.num_seqs, dims.num_q_heads), dims.head_dim, stream,
               out_b, as_device(part_out), as_device(part_ml), parts)
    return out


def _partials(xp, dims: AttnDims, parts: int):
    """part_out [num_seqs, num_q_heads, parts, head_dim] f32 and part_ml [.., parts, 2] f32."""
    if parts == 1:
        d = _dummy(xp)
        return d, d
    shape = (dims.num_seqs, dims.num_q_heads, parts)
    return xp.empty((*shape, dims.head_dim), np.float32), xp.empty((*shape, 2), np.float32)
