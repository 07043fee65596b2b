"""CUDA launcher of paged prefill. Where it applies (fp16/bf16, head_dim up to 128) the fused
tensor-core kernel of kernels/prefill_flash.py runs; otherwise this module's route:
gather -> cuBLAS QK^T -> causal softmax -> cuBLAS PV -> scatter.

Everything is enqueued on one stream with shapes known on the host (num_seqs, max_query_len,
max_pages * page_size), so nothing waits for the device. Sequences go in chunks whose score
block stays under SCORE_BYTES. Scores are kept in the cache dtype (fp16/bf16: cuBLAS accumulates
in float32 on tensor cores and rounds once); queries are pre-scaled so scores stay small.
"""
from __future__ import annotations

import contextlib

import numpy as np

from pagemem.kernels._arrays import as_device, launch
from pagemem.kernels._checks import AttnDims
from pagemem.kernels._device import bits_dtype, dtype_kind
from pagemem.kernels.gemm import matmul
from pagemem.kernels.prefill_kernels import (REG_WORDS, make_gather_kv_kernel, make_gather_q_kernel,
                                     make_gather_q_words_kernel, make_prefill_softmax_kernel,
                                     make_prefill_softmax_regs_kernel, make_scatter_out_kernel,
                                     make_scatter_out_words_kernel)

SCORE_BYTES = 1 << 30      # score block per chunk of sequences
THREADS = 256
SOFTMAX_THREADS = 128
# (threads, uint64 words per thread) of the one-read softmax, smallest first: rows of up to
# 256 * REG_WORDS words (8192 fp16 keys) stay in registers.
SOFTMAX_CLASSES = ((128, 1), (128, 2), (128, 4), (128, REG_WORDS), (256, REG_WORDS))
# prefill_groups: a call's fixed cost (about ten launches) in units of query x key elements,
# about 1k x 1k; beyond MAX_GROUP_ROWS prompts the quadratic search is skipped (one call).
GROUP_PENALTY = 1 << 20
MAX_GROUP_ROWS = 64


def paged_prefill_cuda(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale: float,
                       out, stream, window: int, dims: AttnDims, max_query_len: int,
                       threads: int = THREADS, softmax_threads: int | None = None, softmax_regs: bool = True,
                       path: str = "auto", tiling=None):
    """Enqueue ragged causal attention of q's new tokens; writes and returns ``out``.

    ``path``: "flash" the fused tensor-core kernel (kernels/prefill_flash.py), "gemm" the
    gather + cuBLAS route below, "auto" flash wherever it applies (16-bit caches, head_dim up to
    128; measured 2026-11-27 in bench/RESULTS.md). NumPy arrays run the gemm route's kernels
    under the simulator (tests, with fewer ``threads``). ``softmax_regs=False`` forces the
    three-pass softmax (the fallback for rows too long for registers); ``softmax_threads``
    overrides either softmax's block size; ``tiling`` the flash kernel's block (a
    prefill_flash.Tiling: tests, tuning)."""
    if path not in ("auto", "flash", "gemm"):
        raise ValueError(f"path must be 'auto', 'flash' or 'gemm', got {path!r}")
    xp = _array_module(q)
    if xp is not np:
        stream = stream or xp.cuda.get_current_stream()
        if path != "gemm":
            from pagemem.kernels import prefill_flash
            w = tiling or prefill_flash.TILING
            # the kernel takes row maxima before scaling: a positive scale keeps them maxima
            if scale > 0 and prefill_flash.supports(q, k_cache, v_cache, out, dims, w):
                with stream:
                    return prefill_flash.paged_prefill_flash(q, k_cache, v_cache, page_tables, context_lens,
                                                             query_start_loc, scale, out, window, dims,
                                                             max_query_len, w)
            if path == "flash":
                raise ValueError("path='flash' needs fp16/bf16 q, caches and out of one dtype, head_dim in "
                                 f"{prefill_flash.HEAD_DIMS}, 16-byte aligned rows, compute capability 8.0+ "
                                 "and scale > 0")
    elif path == "flash":
        raise ValueError("path='flash' runs on CUDA arrays only")
    tm = page_tables.shape[1] * dims.page_size
    rows = max_query_len * dims.group
    itemsize = np.dtype(k_cache.dtype).itemsize
    per_seq = dims.num_kv_heads * rows * tm * itemsize
    chunk = max(1, min(dims.num_seqs, SCORE_BYTES // max(per_seq, 1)))
    with stream if xp is not np else contextlib.nullcontext():
        for s0 in range(0, dims.num_seqs, chunk):
            s1 = min(dims.num_seqs, s0 + chunk)
            _prefill_chunk(q, k_cache, v_cache, page_tables[s0:s1], context_lens[s0:s1],
                           query_start_loc[s0:s1 + 1], scale, out, stream, window, dims, rows, tm, xp,
                           (threads, softmax_threads, softmax_regs))
    return out


def _prefill_chunk(q, k_cache, v_cache, page_tables, context_lens, qsl, scale, out, stream, window,
                   dims: AttnDims, rows: int, tm: int, xp, tuning: tuple):
    threads, softmax_threads, regs = tuning
    n, hk, d, g, kind = page_tables.shape[0], dims.num_kv_heads, dims.head_dim, dims.group, dims.cache_kind
    words = d * np.dtype(k_cache.dtype).itemsize // 8
    k_dense = xp.empty((n, hk, tm, d), k_cache.dtype)      # [S, Hkv, Tm, D]
    v_dense = xp.empty((n, hk, tm, d), k_cache.dtype)
    launch(make_gather_kv_kernel(words, dims.page_size), (-(-tm * words // threads), hk, n), threads, stream,
           as_device(k_dense, np.uint64), as_device(v_dense, np.uint64), as_device(k_cache, np.uint64),
           as_device(v_cache, np.uint64), as_device(page_tables), as_device(context_lens))
    q_dense = xp.empty((n, hk, rows, d), k_cache.dtype)    # [S, Hkv, Qm * G, D]
    if dims.q_kind == kind and _words_ok(q):
        launch(make_gather_q_words_kernel(words, g, kind), (-(-rows * words // threads), hk, n), threads, stream,
               as_device(q_dense, np.uint64), as_device(q, np.uint64), as_device(qsl), np.float32(scale))
    else:
        launch(make_gather_q_kernel(d, g, dims.q_kind, kind), (-(-rows * d // threads), hk, n), threads, stream,
               as_device(q_dense, bits_dtype(kind)), as_device(q, bits_dtype(dims.q_kind)), as_device(qsl),
               np.float32(scale))
    scores = matmul(xp, q_dense.reshape(n * hk, rows, d), k_dense.reshape(n * hk, tm, d), True, stream)
    scores = scores.reshape(n, hk, rows, tm)                # [S, Hkv, Qm * G, Tm]
    plan = _softmax_plan(tm * np.dtype(k_cache.dtype).itemsize, softmax_threads) if regs else None
    if plan is None:
        softmax_threads = softmax_threads or SOFTMAX_THREADS
        launch(make_prefill_softmax_kernel(g, kind, softmax_threads), (rows, hk, n), softmax_threads, stream,
               as_device(scores, bits_dtype(kind)), as_device(qsl), as_device(context_lens), window)
    else:
        softmax_threads, words_per_thread = plan
        launch(make_prefill_softmax_regs_kernel(g, kind, softmax_threads, words_per_thread), (rows, hk, n),
               softmax_threads, stream,
               as_device(scores, np.uint64), as_device(qsl), as_device(context_lens), window)
    o_dense = matmul(xp, scores.reshape(n * hk, rows, tm), v_dense.reshape(n * hk, tm, d), False, stream)
    o_dense = o_dense.reshape(n, hk, rows, d)               # [S, Hkv, Qm * G, D]
    out_kind = dtype_kind(out.dtype, "out")
    if out_kind == kind and _words_ok(out):
        launch(make_scatter_out_words_kernel(words, g), (-(-rows * words // threads), hk, n), threads, stream,
               as_device(out, np.uint64), as_device(o_dense, np.uint64), as_device(qsl))
    else:
        launch(make_scatter_out_kernel(d, g, kind, out_kind), (-(-rows * d // threads), hk, n), threads, stream,
               as_device(out, bits_dtype(out_kind)), as_device(o_dense, bits_dtype(kind)), as_device(qsl))


def _words_ok(x) -> bool:
    """Whether [num_tokens, heads, head_dim] x can be read as uint64 words: last axis contiguous,
    the other strides whole words."""
    st = x.strides
    return st[2] == x.itemsize and st[0] % 8 == 0 and st[1] % 8 == 0 and (x.shape[2] * x.itemsize) % 8 == 0


def _softmax_plan(row_bytes: int, threads: int | None) -> tuple[int, int] | None:
    """(threads, words per thread) of the one-read softmax for score rows of ``row_bytes``: the
    first of SOFTMAX_CLASSES that holds the row (few variants: each compiles once); None when a
    row does not fit in registers (three passes). ``threads`` forces the block size (tests)."""
    words = row_bytes // 8
    if row_bytes % 8:
        return None
    if threads:
        per_thread = -(-words // threads)
        return (threads, per_thread) if per_thread <= REG_WORDS else None
    return next(((n, per_thread) for n, per_thread in SOFTMAX_CLASSES if words <= n * per_thread), None)


def prefill_groups(query_lens, context_lens, page_size: int, penalty: int | None = None) -> list[tuple[int, int]]:
    """Split prompts 0..n (host new-token and context lengths) into contiguous groups [a, b), one
    call of this route each, minimizing the padded work (the route pads every sequence of a call
    to its longest query and page-rounded context): sum of rows * longest query * longest
    context, plus ``penalty`` per group (a call's fixed cost in the same units). Exact dynamic
    programme over cut points; prompts sorted by length (as the scheduler packs them) group best."""
    n = len(query_lens)
    penalty = GROUP_PENALTY if penalty is None else penalty
    if n <= 1 or n > MAX_GROUP_ROWS:
        return [(0, n)]
    q = [int(x) for x in query_lens]
    t = [-(-int(c) // page_size) * page_size for c in context_lens]
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        mq = mt = 0
        for a in range(b - 1, -1, -1):
            mq, mt = max(mq, q[a]), max(mt, t[a])
            cost = best[a] + (b - a) * mq * mt + penalty
            if best[b] is None or cost < best[b]:
                best[b], cut[b] = cost, a
    groups, b = [], n
    while b > 0:
        groups.append((cut[b], b))
        b = cut[b]
    return groups[::-1]


def prefill_key_classes(itemsize: int) -> list[int]:
    """The longest score row (keys, page-padded context) of each one-read softmax variant for a
    cache of ``itemsize`` bytes: an engine's start-up warm-up compiles each by running one
    prompt of that length."""
    return [threads * per_thread * 8 // itemsize for threads, per_thread in SOFTMAX_CLASSES]


def _array_module(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy
    return cupy
