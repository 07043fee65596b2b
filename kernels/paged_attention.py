"""Paged decode attention (one query token per sequence), Numba CUDA, optimized version (_v2).

One block per (sequence, KV head, partition): it reads its KV head's tokens once for the whole
GQA group of query heads (up to 8 per block). Tokens are split across *token groups* of
``lanes`` threads; each group streams whole tokens (K and V rows read as uint64 words, four
fp16/bf16 values each, unpacked in registers), keeps an online softmax per query head, and the
groups are merged through shared memory at the end. Page ids are staged in shared memory a
chunk at a time (no token load waits on a page-table load), and each lane issues the next step's
loads before the current step's math (register double buffer). With split-K (flash-decoding),
each partition writes unnormalized partial outputs plus (max, sum) and
``make_decode_reduce_kernel`` merges them. The launcher orders the grid KV heads first
(``heads_major``): a page interleaves every KV head's rows (token stride = num_kv_heads rows), so
the blocks of one sequence's heads run side by side and together read each page's K/V span whole.

    token groups of one block (lanes=16, 128 threads -> 8 groups; with tokens_per_group=2)
    step 0: group g takes tokens base+g and base+8+g; step 1: base += 16; ...
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, uint64

from pagemem.kernels._device import ELEMS_PER_WORD, SIM, load_scalar, make_group_sum, store_scalar, unpack
from pagemem.kernels._warp import exp2

# Measured on an H100 at Llama-3.2-1B's heads (bench/bench_attention.py --tune, 2026-11-26): under
# the 128-register cap (4 blocks of 128 threads per SM), 1 token per group took 6 to 9% less time
# than 2 at 256x512 and 64x2048, head_dim 64 and 128 alike (KV-head-major grid). Earlier, 2 capped
# had beaten 1 *uncapped* (168 registers, 3 blocks per SM) by 10 to 42%: keep the cap.
TOKENS_PER_GROUP = 1
MAX_REGISTERS = 128
MAX_REG_ELEMS = 32    # q (and acc) floats per thread per block: heads_per_block * elems_per_lane
PAGES_CHUNK = 256     # page ids a block stages in shared memory at a time


def choose_lanes(head_dim: int, heads_per_block: int, cache_kind: int, max_reg_elems: int = MAX_REG_ELEMS) -> int:
    """Fewest lanes per token (4..32) that keep heads_per_block * elems_per_lane <= max_reg_elems:
    fewer lanes mean fewer shuffle steps per token, more lanes mean fewer registers."""
    words = head_dim // ELEMS_PER_WORD[cache_kind]
    for lanes in (4, 8, 16, 32):
        if heads_per_block * -(-words // lanes) * ELEMS_PER_WORD[cache_kind] <= max_reg_elems:
            return lanes
    return 32


def heads_per_block(group: int) -> int:
    """Largest divisor of the GQA group size that is <= 8 (register budget); MQA with 32 query
    heads reads its KV head 4 times, every GQA ratio up to 8 reads it once."""
    return max(c for c in range(1, 9) if group % c == 0)


@functools.cache
def make_paged_decode_kernel(head_dim: int, page_size: int, group: int, heads: int, cache_kind: int,
                             q_kind: int, out_kind: int, split: bool, lanes: int, threads: int,
                             tokens_per_group: int = TOKENS_PER_GROUP, max_registers: int | None = MAX_REGISTERS,
                             heads_major: bool = False):
    """Decode attention over pages, float32 accumulation.

    Launch: grid=(num_seqs, num_kv_heads * group // heads, num_partitions), block=threads; with
    ``heads_major`` grid=(num_kv_heads * group // heads, num_seqs, num_partitions), so the blocks of
    one sequence's KV heads are resident together and read each page's interleaved heads at once.
    Thread t is lane t % lanes of token group t // lanes; lane j owns words j, j+lanes, ... of a
    token row and the matching q/output elements for the block's ``heads`` query heads.
    Preconditions: page_size a power of two; context_lens >= 1; valid page ids for the tokens
    read (lanes past a row's last word are masked). ``max_registers`` caps ptxas (None: free).
    Output: split=False writes out[s, h, :]; split=True writes unnormalized part_out[s, h, p, :]
    and part_ml[s, h, p] = (running max, running sum) for make_decode_reduce_kernel.
    """
    D, P, G, GC, NT, LPT = head_dim, page_size, group, heads, threads, lanes
    E = ELEMS_PER_WORD[cache_kind]
    W = D // E                 # uint64 words per token row
    WPL = -(-W // LPT)         # words per lane
    EPL = WPL * E              # elements per lane
    NG = NT // LPT             # token groups per block
    U = tokens_per_group
    TPI = NG * U               # tokens per block step
    PSHIFT = P.bit_length() - 1
    SCRATCH = NT if SIM else 1
    N_REG, N_WORDS, N_SC = GC * EPL, U * WPL, U * GC   # local array sizes must be plain constants
    N_SM_ML, N_SM_ACC = NG * GC, NG * GC * D
    TC = PAGES_CHUNK * P       # tokens per staged chunk of page ids
    NEG_INF = float32(-math.inf)
    unpack_w, load_q = unpack[cache_kind], load_scalar[q_kind]
    group_sum = make_group_sum(LPT)
    block_coords = make_block_coords(heads_major, G, GC)
    merge_states = make_merge_states(D, GC, NG, GC, False, split, out_kind, NT)

    @cuda.jit(device=True)
    def load_step(kw, vw, k_flat, v_flat, sm_pages, pbase, base, hi, lane_word, page_words, token_words, g, j):
        """Issue this lane's loads of the step's tokens base + u * NG + g (< hi) into kw, vw."""
        for u in range(U):
            t = base + u * NG + g
            ok = t < hi
            row = uint64(0)   # word offset of (page, token, kv head); unsigned: no wraparound code
            if ok:
                row = uint64(sm_pages[(t >> PSHIFT) - pbase]) * page_words + uint64(t & (P - 1)) * token_words
            for i in range(WPL):
                if ok and i * LPT + j < W:
                    kw[u * WPL + i] = k_flat[row + lane_word + uint64(i * LPT)]
                    vw[u * WPL + i] = v_flat[row + lane_word + uint64(i * LPT)]
                else:
                    kw[u * WPL + i] = uint64(0)
                    vw[u * WPL + i] = uint64(0)

    @cuda.jit(device=True)
    def attend_step(kw, vw, qr, acc, m, lsum, sc, base, hi, g, scratch, tid):
        """Scores of the step's tokens for the block's heads, then the online-softmax update."""
        for u in range(U):
            valid = base + u * NG + g < hi
            for h in range(GC):
                dot = float32(0)
                for i in range(WPL):
                    for e in range(E):
                        dot += qr[h * EPL + i * E + e] * unpack_w(kw[u * WPL + i], e)
                dot = group_sum(dot, scratch, tid)
                sc[u * GC + h] = dot if valid else NEG_INF
        # Branch-free online softmax, so V is unpacked once for all heads: a group with no
        # token yet has m = -inf, and ms = 0 keeps alpha = p = 0 (never -inf - -inf).
        for h in range(GC):
            mx = m[h]
            for u in range(U):
                mx = max(mx, sc[u * GC + h])
            ms = mx if mx != NEG_INF else float32(0)
            alpha = math.exp(m[h] - ms)
            ls = lsum[h] * alpha
            for x in range(EPL):
                acc[h * EPL + x] *= alpha
            for u in range(U):
                p = math.exp(sc[u * GC + h] - ms)
                ls += p
                for i in range(WPL):
                    for e in range(E):
                        acc[h * EPL + i * E + e] += p * unpack_w(vw[u * WPL + i], e)
            lsum[h] = ls
            m[h] = mx

    @cuda.jit(**({} if SIM or not max_registers else {"max_registers": max_registers}))
    def paged_decode_kernel(out, part_out, part_ml, q, k_flat, v_flat, page_tables, context_lens,
                            scale, window, part_tokens, page_words, token_words, head_words):
        # out, q: [num_seqs, num_q_heads, D] (bits for 16-bit kinds)
        # part_out: [num_seqs, num_q_heads, num_parts, D] f32; part_ml: [.., num_parts, 2] f32
        # k_flat, v_flat: the caches [num_pages, P, num_kv_heads, W] as flat uint64 words, with
        # word strides page_words (page), token_words (token) and head_words (kv head)
        s, kvh, h0, part = block_coords()
        tid = cuda.threadIdx.x
        g = tid // LPT
        j = tid % LPT
        scratch = cuda.shared.array(SCRATCH, float32)
        sm_pages = cuda.shared.array(PAGES_CHUNK, int32)
        qr = cuda.local.array(N_REG, float32)
        acc = cuda.local.array(N_REG, float32)
        m = cuda.local.array(GC, float32)
        lsum = cuda.local.array(GC, float32)
        kw = cuda.local.array(N_WORDS, uint64)   # this step's K/V words
        vw = cuda.local.array(N_WORDS, uint64)
        kn = cuda.local.array(N_WORDS, uint64)   # next step's, in flight during this step's math
        vn = cuda.local.array(N_WORDS, uint64)
        sc = cuda.local.array(N_SC, float32)
        for h in range(GC):
            m[h] = NEG_INF
            lsum[h] = float32(0)
            for i in range(WPL):
                for e in range(E):
                    d = (i * LPT + j) * E + e
                    x = float32(0)
                    if d < D:
                        x = load_q(q[s, h0 + h, d]) * scale
                    qr[h * EPL + i * E + e] = x
                    acc[h * EPL + i * E + e] = float32(0)

        pw, tw = uint64(page_words), uint64(token_words)
        lane_word = uint64(kvh * head_words + j)
        start, end = partition_range(context_lens[s], window, part, part_tokens)
        # Chunks of PAGES_CHUNK pages: their ids are staged in shared memory, so no token load
        # waits on a page-table load; within a chunk, step n+1's loads fly during step n's math.
        for c0 in range((start >> PSHIFT) << PSHIFT, end, TC):  # block-uniform loops throughout
            pbase = c0 >> PSHIFT
            for i in range(tid, PAGES_CHUNK, NT):
                pg = 0
                if (pbase + i) << PSHIFT < end:
                    pg = page_tables[s, pbase + i]
                sm_pages[i] = pg
            cuda.syncthreads()  # page ids staged
            lo_c, hi_c = max(start, c0), min(end, c0 + TC)
            load_step(kw, vw, k_flat, v_flat, sm_pages, pbase, lo_c, hi_c, lane_word, pw, tw, g, j)
            for base in range(lo_c, hi_c, TPI):
                load_step(kn, vn, k_flat, v_flat, sm_pages, pbase, base + TPI, hi_c, lane_word, pw, tw, g, j)
                attend_step(kw, vw, qr, acc, m, lsum, sc, base, hi_c, g, scratch, tid)
                for x in range(N_WORDS):
                    kw[x] = kn[x]
                    vw[x] = vn[x]
            cuda.syncthreads()  # every lane is done with sm_pages before it is restaged

        # ---- merge the token groups through shared memory ----
        sm_m = cuda.shared.array(N_SM_ML, float32)
        sm_l = cuda.shared.array(N_SM_ML, float32)
        sm_acc = cuda.shared.array(N_SM_ACC, float32)
        for h in range(GC):
            if j == 0:
                sm_m[g * GC + h] = m[h]
                sm_l[g * GC + h] = lsum[h]
            for i in range(WPL):
                for e in range(E):
                    d = (i * LPT + j) * E + e
                    if d < D:
                        sm_acc[(g * GC + h) * D + d] = acc[h * EPL + i * E + e]
        cuda.syncthreads()  # all groups' states are in shared memory
        merge_states(out, part_out, part_ml, sm_m, sm_l, sm_acc, s, h0, part, tid)

    return paged_decode_kernel


@functools.cache
def make_block_coords(heads_major: bool, group: int, heads: int):
    """block_coords() -> (sequence, KV head, first query head, partition) of this block of a decode
    grid laid out as the launchers lay it out (``heads_major``: KV-head chunks along x)."""
    chunks = group // heads

    @cuda.jit(device=True)
    def block_coords():
        if heads_major:
            s = cuda.blockIdx.y
            hb = cuda.blockIdx.x
        else:
            s = cuda.blockIdx.x
            hb = cuda.blockIdx.y
        kvh = hb // chunks
        return s, kvh, kvh * group + (hb % chunks) * heads, cuda.blockIdx.z
    return block_coords


@cuda.jit(device=True)
def partition_range(ctx, window, part, part_tokens):
    """(start, end): the tokens partition ``part`` of a sequence of ``ctx`` tokens reads, the
    last ``window`` of them when window > 0; empty (start >= end) past the sequence's end."""
    lo = 0
    if window > 0:
        lo = max(0, ctx - window)
    start = lo + part * part_tokens
    return start, min(ctx, start + part_tokens)


@functools.cache
def make_merge_states(head_dim: int, heads: int, states: int, stride: int, log2_units: bool, split: bool,
                      out_kind: int, threads: int):
    """merge_states(out, part_out, part_ml, sm_m, sm_l, sm_o, s, h0, part, tid): merge a block's
    ``states`` online-softmax states of its ``heads`` query heads, held in shared memory (state i
    of head h: max sm_m[i * stride + h], sum sm_l[..], unnormalized output sm_o[(..) * head_dim + d];
    maxima in log2 units when ``log2_units``), and write the block's output (out[s, h0 + h, :]) or,
    with ``split``, its partial output and (max, sum) in natural-log units. Every thread of the
    block takes elements (h, d) in turn; call after the barrier that publishes the states."""
    D, GC, NS, ST, NT = head_dim, heads, states, stride, threads
    NEG_INF, LN2 = float32(-math.inf), float32(math.log(2.0))
    store_o = store_scalar[out_kind]
    exp_ = exp2 if log2_units else math.exp
    to_natural = LN2 if log2_units else float32(1)

    @cuda.jit(device=True)
    def merge_states(out, part_out, part_ml, sm_m, sm_l, sm_o, s, h0, part, tid):
        for idx in range(tid, GC * D, NT):
            h = idx // D
            d = idx - h * D
            mx = NEG_INF
            for i in range(NS):
                mx = max(mx, sm_m[i * ST + h])
            ls = float32(0)
            acc = float32(0)
            if mx != NEG_INF:
                for i in range(NS):
                    f = exp_(sm_m[i * ST + h] - mx)
                    ls += sm_l[i * ST + h] * f
                    acc += sm_o[(i * ST + h) * D + d] * f
            if split:
                part_out[s, h0 + h, part, d] = acc
                if d == 0:
                    part_ml[s, h0 + h, part, 0] = mx * to_natural
                    part_ml[s, h0 + h, part, 1] = ls
            else:
                out[s, h0 + h, d] = store_o(acc / ls)
    return merge_states


@functools.cache
def make_decode_reduce_kernel(head_dim: int, out_kind: int):
    """Merge split-K partitions: out = sum_p o_p e^(m_p - M) / sum_p l_p e^(m_p - M).

    Launch: grid=(num_seqs, num_q_heads), block=head_dim; thread d owns output element d.
    Empty partitions carry m = -inf, l = 0, o = 0; at least one partition per row is non-empty.
    """
    store_o = store_scalar[out_kind]
    NEG_INF = float32(-math.inf)

    @cuda.jit
    def decode_reduce_kernel(out, part_out, part_ml, num_parts):
        # out: [num_seqs, num_q_heads, D]; part_out: [.., num_parts, D]; part_ml: [.., num_parts, 2]
        s, h, d = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        mx = NEG_INF
        for p in range(num_parts):
            mx = max(mx, part_ml[s, h, p, 0])
        ls = float32(0)
        o = float32(0)
        for p in range(num_parts):
            f = math.exp(part_ml[s, h, p, 0] - mx)
            ls += part_ml[s, h, p, 1] * f
            o += part_out[s, h, p, d] * f
        out[s, h, d] = store_o(o / ls)

    return decode_reduce_kernel
