"""Numba CUDA kernels of the prefill path: gather pages and queries into dense padded blocks,
a causal (optionally sliding-window) softmax over score rows, and the scatter back.

The matrix products between them run in cuBLAS through CuPy (kernels/prefill.py): for
thousands of new tokens attention is compute-bound, and tensor cores beat any Numba loop.

Dense layouts (per chunk of ``S`` sequences, ``Qm`` = max_query_len, ``Tm`` = max_pages * page_size):
    q_dense   [S, num_kv_heads, Qm * group, head_dim]   row r = query i * group + g
    k_dense   [S, num_kv_heads, Tm, head_dim]           zero past context_len
    scores    [S, num_kv_heads, Qm * group, Tm]         probabilities after the softmax
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, uint64

from pagemem.kernels._device import (ELEMS_PER_WORD, F32, f32_to_bits, load_scalar, make_block_reduce, store_scalar,
                             unpack)


@functools.cache
def make_gather_kv_kernel(words_per_row: int, page_size: int):
    """k_dense[s, h, t, :] = k_cache[page_tables[s, t // P], t % P, h, :] for t < context_lens[s],
    zero after (NULL_PAGE padding is never read). Launch: grid=(ceil(Tm * W / threads), H, S),
    one uint64 word per thread. Preconditions: page ids of the first context_lens[s] tokens are valid."""
    W, P = words_per_row, page_size
    PSHIFT = P.bit_length() - 1

    @cuda.jit
    def gather_kv_kernel(k_dense, v_dense, k_words, v_words, page_tables, context_lens):
        # k_dense, v_dense: [S, H, Tm, W] uint64; k_words, v_words: [num_pages, P, H, W] uint64
        h, s = cuda.blockIdx.y, cuda.blockIdx.z
        x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        t, w = x // W, x % W               # W is a constant: no run-time division
        if t < k_dense.shape[2]:
            kx, vx = uint64(0), uint64(0)
            if t < context_lens[s]:
                page = page_tables[s, t >> PSHIFT]
                kx = k_words[page, t & (P - 1), h, w]
                vx = v_words[page, t & (P - 1), h, w]
            k_dense[s, h, t, w] = kx
            v_dense[s, h, t, w] = vx

    return gather_kv_kernel


@functools.cache
def make_gather_q_kernel(head_dim: int, group: int, q_kind: int, dense_kind: int):
    """q_dense[s, hk, i * group + g, d] = scale * q[qsl[s] + i, hk * group + g, d] for i < the
    sequence's query count, zero after. Launch: grid=(ceil(Qm * G * D / threads), Hkv, S)."""
    G, D = group, head_dim
    load, store = load_scalar[q_kind], store_scalar[dense_kind]

    @cuda.jit
    def gather_q_kernel(q_dense, q, query_start_loc, scale):
        # q_dense: [S, Hkv, Qm * G, D]; q: [num_tokens, Hq, D]; query_start_loc: [S + 1] int32
        hk, s = cuda.blockIdx.y, cuda.blockIdx.z
        x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        r, d = x // D, x % D               # constants: no run-time division
        if r < q_dense.shape[2]:
            i, g = r // G, r % G
            val = float32(0)
            if i < query_start_loc[s + 1] - query_start_loc[s]:
                val = load(q[query_start_loc[s] + i, hk * G + g, d]) * scale
            q_dense[s, hk, r, d] = store(val)

    return gather_q_kernel


@functools.cache
def make_scatter_out_kernel(head_dim: int, group: int, dense_kind: int, out_kind: int):
    """out[qsl[s] + i, hk * group + g, d] = o_dense[s, hk, i * group + g, d] for real queries.
    Launch: grid=(ceil(Qm * G * D / threads), Hkv, S)."""
    G, D = group, head_dim
    load, store = load_scalar[dense_kind], store_scalar[out_kind]

    @cuda.jit
    def scatter_out_kernel(out, o_dense, query_start_loc):
        hk, s = cuda.blockIdx.y, cuda.blockIdx.z
        x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        r, d = x // D, x % D
        i, g = r // G, r % G
        if r < o_dense.shape[2] and i < query_start_loc[s + 1] - query_start_loc[s]:
            out[query_start_loc[s] + i, hk * G + g, d] = store(load(o_dense[s, hk, r, d]))

    return scatter_out_kernel


@functools.cache
def make_prefill_softmax_kernel(group: int, kind: int, threads: int):
    """In place, scores -> causal softmax probabilities, float32 math.

    Launch: grid=(Qm * group, num_kv_heads, S), block=threads; the block owns one score row
    (query i = row // group at position context_len - query_len + i) and strides over its keys.
    Keys j <= pos (and pos - j < window when window > 0) get probabilities, the rest zero.
    Rows past the sequence's query count are left untouched (their output is never scattered).
    """
    G, NT = group, threads
    load, store = load_scalar[kind], store_scalar[kind]
    block_max, block_sum = make_block_reduce(NT, True), make_block_reduce(NT, False)
    NEG_INF = float32(-math.inf)

    @cuda.jit
    def prefill_softmax_kernel(scores, query_start_loc, context_lens, window):
        # scores: [S, Hkv, Qm * G, Tm] (uint16 bits or float32)
        r, hk, s = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        qlen = query_start_loc[s + 1] - query_start_loc[s]
        i = r // G
        if i >= qlen:  # block-uniform exit: no barrier is skipped by part of the block
            return
        pos = context_lens[s] - qlen + i
        lo = 0
        if window > 0:
            lo = max(0, pos - window + 1)
        sm = cuda.shared.array(NT, float32)
        m = NEG_INF
        for j in range(lo + tid, pos + 1, NT):  # pass 1: row max
            m = max(m, load(scores[s, hk, r, j]))
        mx = block_max(m, sm, tid)
        l = float32(0)
        for j in range(lo + tid, pos + 1, NT):  # pass 2: sum of exponentials
            l += math.exp(load(scores[s, hk, r, j]) - mx)
        inv = float32(1) / block_sum(l, sm, tid)
        for j in range(tid, scores.shape[3], NT):  # pass 3: probabilities, zero outside [lo, pos]
            p = float32(0)
            if lo <= j <= pos:
                p = math.exp(load(scores[s, hk, r, j]) - mx) * inv
            scores[s, hk, r, j] = store(p)

    return prefill_softmax_kernel


REG_WORDS = 8   # most uint64 words of a score row one thread keeps in registers


@functools.cache
def make_prefill_softmax_regs_kernel(group: int, kind: int, threads: int, words_per_thread: int):
    """The same causal softmax in one read of the row: for rows of at most
    threads * words_per_thread uint64 words, each thread holds its words' scores in registers.
    Only words overlapping the unmasked keys [lo, pos] are read; every word is written (zeros
    outside), so the PV product needs no mask. Launch: grid=(Qm * group, num_kv_heads, S)."""
    G, NT, WPT = group, threads, words_per_thread
    E = ELEMS_PER_WORD[kind]
    BITS = 64 // E
    unpack_w, store = unpack[kind], store_scalar[kind]
    to_bits = f32_to_bits if kind == F32 else store
    block_max, block_sum = make_block_reduce(NT, True), make_block_reduce(NT, False)
    NEG_INF = float32(-math.inf)
    N = WPT * E

    @cuda.jit
    def prefill_softmax_regs_kernel(scores, query_start_loc, context_lens, window):
        # scores: [S, Hkv, Qm * G, Tm // E] uint64 words
        r, hk, s = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        qlen = query_start_loc[s + 1] - query_start_loc[s]
        if r // G >= qlen:  # block-uniform exit
            return
        pos = context_lens[s] - qlen + r // G
        lo = 0
        if window > 0:
            lo = max(0, pos - window + 1)
        sm = cuda.shared.array(NT, float32)
        vals = cuda.local.array(N, float32)
        m = NEG_INF
        for k in range(WPT):
            w = tid + k * NT
            j0 = w * E
            word = uint64(0)
            live = w < scores.shape[3] and j0 <= pos and j0 + E > lo
            if live:
                word = scores[s, hk, r, w]
            for e in range(E):
                x = NEG_INF
                if live and lo <= j0 + e <= pos:
                    x = unpack_w(word, e)
                vals[k * E + e] = x
                m = max(m, x)
        mx = block_max(m, sm, tid)
        l = float32(0)
        for i in range(N):
            p = math.exp(vals[i] - mx)   # exp(-inf) = 0 for masked keys
            vals[i] = p
            l += p
        inv = float32(1) / block_sum(l, sm, tid)
        for k in range(WPT):
            w = tid + k * NT
            if w < scores.shape[3]:
                word = uint64(0)
                for e in range(E):
                    word |= uint64(to_bits(vals[k * E + e] * inv)) << uint64(BITS * e)
                scores[s, hk, r, w] = word

    return prefill_softmax_regs_kernel



@functools.cache
def make_gather_q_words_kernel(words_per_row: int, group: int, kind: int):
    """gather_q for q already in the dense dtype, a uint64 word (four fp16/bf16 or two fp32
    values) per thread. Launch: grid=(ceil(Qm * G * W / threads), Hkv, S)."""
    G, W = group, words_per_row
    E = ELEMS_PER_WORD[kind]
    BITS = 64 // E
    unpack_w = unpack[kind]
    to_bits = f32_to_bits if kind == F32 else store_scalar[kind]

    @cuda.jit
    def gather_q_words_kernel(q_dense, q, query_start_loc, scale):
        # q_dense: [S, Hkv, Qm * G, W] uint64; q: [num_tokens, Hq, W] uint64
        hk, s = cuda.blockIdx.y, cuda.blockIdx.z
        x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        r, w = x // W, x % W               # constants: no run-time division
        if r < q_dense.shape[2]:
            i, g = r // G, r % G
            word = uint64(0)
            if i < query_start_loc[s + 1] - query_start_loc[s]:
                src = q[query_start_loc[s] + i, hk * G + g, w]
                for e in range(E):
                    word |= uint64(to_bits(unpack_w(src, e) * scale)) << uint64(BITS * e)
            q_dense[s, hk, r, w] = word

    return gather_q_words_kernel


@functools.cache
def make_scatter_out_words_kernel(words_per_row: int, group: int):
    """scatter_out when out has the dense dtype: a uint64 word copy per thread.
    Launch: grid=(ceil(Qm * G * W / threads), Hkv, S)."""
    G, W = group, words_per_row

    @cuda.jit
    def scatter_out_words_kernel(out, o_dense, query_start_loc):
        hk, s = cuda.blockIdx.y, cuda.blockIdx.z
        x = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        r, w = x // W, x % W
        i, g = r // G, r % G
        if r < o_dense.shape[2] and i < query_start_loc[s + 1] - query_start_loc[s]:
            out[query_start_loc[s] + i, hk * G + g, w] = o_dense[s, hk, r, w]

    return scatter_out_words_kernel
