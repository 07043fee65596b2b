"""Naive paged decode (_v1): the documented baseline the bench compares _v2 against.

One block per (sequence, query head), one thread per output element, one token per block step
with a shared-memory tree reduction of q.k; scalar 16-bit loads; the KV head is read once per
query head. Not part of the library: bench_attention times it beside the library's kernels.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from pagemem.kernels._arrays import as_device, launch
from pagemem.kernels._device import bits_dtype, dtype_kind, load_scalar, store_scalar


@functools.cache
def make_paged_decode_v1_kernel(head_dim: int, page_size: int, cache_kind: int, q_kind: int, out_kind: int):
    """Launch: grid=(num_seqs, num_q_heads), block=next power of two >= head_dim; thread d owns
    output element d. Preconditions: context_lens >= 1; valid page ids; window 0 = none."""
    D, P = head_dim, page_size
    NT = 1 << (D - 1).bit_length()
    ld_c, ld_q, st_o = load_scalar[cache_kind], load_scalar[q_kind], store_scalar[out_kind]
    NEG_INF = float32(-math.inf)

    @cuda.jit
    def paged_decode_v1_kernel(out, q, k_cache, v_cache, page_tables, context_lens, scale, group, window):
        s, h, d = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        kvh = h // group
        partial = cuda.shared.array(NT, float32)
        qd = float32(0)
        if d < D:
            qd = ld_q(q[s, h, d]) * scale
        m, l, acc = NEG_INF, float32(0), float32(0)
        ctx = context_lens[s]
        lo = 0
        if window > 0:
            lo = max(0, ctx - window)
        for t in range(lo, ctx):  # same trip count for the whole block: barriers are safe
            page, off = page_tables[s, t // P], t % P
            kd, vd = float32(0), float32(0)
            if d < D:
                kd, vd = ld_c(k_cache[page, off, kvh, d]), ld_c(v_cache[page, off, kvh, d])
            partial[d] = qd * kd
            cuda.syncthreads()  # all products written
            stride = NT // 2
            while stride > 0:
                if d < stride:
                    partial[d] += partial[d + stride]
                cuda.syncthreads()  # this level summed before the next reads it
                stride //= 2
            score = partial[0]
            cuda.syncthreads()  # everyone has read partial[0] before the next overwrite
            m_new = max(m, score)
            p, alpha = math.exp(score - m_new), math.exp(m - m_new)
            l, acc, m = l * alpha + p, acc * alpha + p * vd, m_new
        if d < D:
            out[s, h, d] = st_o(acc / l)

    return paged_decode_v1_kernel


def paged_decode_v1(q, k_cache, v_cache, page_tables, context_lens, scale: float, out, stream=None,
                    window: int = 0):
    """Enqueue the naive kernel (arguments as paged_decode, already checked)."""
    ck, qk, ok = (dtype_kind(x.dtype, n) for x, n in ((k_cache, "k_cache"), (q, "q"), (out, "out")))
    kernel = make_paged_decode_v1_kernel(q.shape[2], k_cache.shape[1], ck, qk, ok)
    threads = 1 << (q.shape[2] - 1).bit_length()
    launch(kernel, (q.shape[0], q.shape[1]), threads, stream,
        as_device(out, bits_dtype(ok)), as_device(q, bits_dtype(qk)), as_device(k_cache, bits_dtype(ck)),
        as_device(v_cache, bits_dtype(ck)), as_device(page_tables), as_device(context_lens),
        np.float32(scale), q.shape[1] // k_cache.shape[2], window)
    return out
