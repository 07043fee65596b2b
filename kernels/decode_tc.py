"""Paged decode attention on the tensor cores (fp16 and bf16 caches), a Numba kernel.

A block serves one (sequence, KV head, partition) for up to 8 of that KV head's query heads. Its
warps take 16-token tiles in turn; a tile is two ``mma.m16n8k16`` products fed straight from
registers (no shared memory, no ldmatrix):

    S   [heads x 8 tokens]  = Q   [heads x 16 dims]   . K^T [16 dims x 8 tokens]    (twice, per 16 dims)
    O^T [16 dims x heads]  += V^T [16 dims x 16 tokens] . P^T [16 tokens x heads]   (per 16 dims)

The heads are the rows of the first product (rows 8..15 are zero) and the columns of the second,
so the scores of head ``grp`` for tokens 2tig and 2tig+1 come out of the first product exactly
where the second wants its B operand: P never leaves the registers (kernels/_warp.py gives the
fragment layout and the names grp, tig). A lane loads K and V in runs of 8 dims (16 bytes):

- K: a dot product may take its 16-dim k-steps' dims in any order, the same for q and K, so a
  lane's run of dims 8tig..8tig+8 of one token feeds two k-steps of a 32-dim chunk.
- P: fp16 keeps p to 11 bits; bf16 only to 8, so for bf16 caches what rounding dropped,
  p - bf16(p), goes through a second product with the same V (p to about 16 bits, two mma).
- V: the second product's A operand pairs two tokens of one dim in a register; a lane loads runs
  of dims 8grp..8grp+8 of four tokens and interleaves them with byte permutes. The 16 dims of a
  product are 8grp + 2i (rows grp) and 8grp + 2i + 1 (rows grp + 8), i = 0..3, so a lane ends
  holding dims 8grp..8grp+8 of heads 2tig and 2tig+1.

Per 16 tokens at head_dim 128 a lane issues 16 loads of 16 bytes (as 64-bit loads), 24 mma and
about a hundred other instructions: the CUDA-core kernel (kernels/paged_attention.py) spends
about 12 instructions per K/V element at GQA 4, near the issue limit at H200 bandwidth; this one
spends under one. Its warps are merged through shared memory at the end (online-softmax
states); with split-K each block writes its partial output for ``make_decode_reduce_kernel``.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, uint32, uint64

from pagemem.kernels._device import BF16, F16, SIM, bits_to_f32, load_scalar, store_scalar
from pagemem.kernels._warp import exp2, make_mma, make_pack2, scratch_words, shfl_idx, shfl_xor
from pagemem.kernels.paged_attention import make_block_coords, make_merge_states, partition_range

TILE = 16
MAX_HEADS = 8          # query heads a block serves (the columns of the P.V product)
LOG2E = 1.4426950408889634
MAX_SHARED_FLOATS = 12288   # the warps' merge buffer stays within 48 KiB of static shared memory


def tc_eligible(head_dim: int, page_size: int, cache_kind: int) -> bool:
    """Shapes this kernel serves: 16-bit caches, head_dim a multiple of 8 (16-byte runs) up to
    256, pages of at least 8 tokens (a tile's half lies on one page)."""
    return cache_kind in (F16, BF16) and head_dim % 8 == 0 and 8 <= head_dim <= 256 and page_size >= 8


def tc_warps(head_dim: int, warps: int) -> int:
    """Warps a block may have: the merge buffer holds warps x 8 heads x head_dim floats."""
    while warps > 1 and warps * MAX_HEADS * head_dim > MAX_SHARED_FLOATS:
        warps //= 2
    return warps


@functools.cache
def make_paged_decode_tc_kernel(head_dim: int, page_size: int, group: int, heads: int, cache_kind: int,
                                q_kind: int, out_kind: int, split: bool, warps: int,
                                heads_major: bool = True, max_registers: int | None = None):
    """Decode attention over pages on the tensor cores; same arguments and outputs as
    ``make_paged_decode_kernel`` (kernels/paged_attention.py), with ``warps`` warps a block.

    Launch: grid=(num_kv_heads * group // heads, num_seqs, num_partitions) when ``heads_major``
    (else sequences first), block=32 * warps. The caches come as flat uint64 words with their word
    strides, which must be even (16-byte runs), as the plan checks. Preconditions as there:
    page_size a power of two, context_lens >= 1, valid page ids for the tokens read.
    """
    D, P, G, GC, NW = head_dim, page_size, group, heads, warps
    NT = 32 * NW
    DC = -(-D // 32)            # 32-dim chunks of K (two k-steps each)
    DV = -(-D // 64)            # 64-dim chunks of V (four 16-dim products each)
    PSHIFT = P.bit_length() - 1
    N_Q, N_K, N_V, N_O = 4 * DC, 4 * DC, 8 * DV, 16 * DV
    SCR = scratch_words(NT)
    SM_ML, SM_O = NW * MAX_HEADS, NW * MAX_HEADS * D
    NEG_INF = float32(-math.inf)
    L2E = float32(LOG2E)
    ZERO32, LO16, HI16, S16 = uint32(0), uint32(0xFFFF), uint32(0xFFFF0000), uint32(16)
    LO32, S32 = uint64(0xFFFFFFFF), uint64(32)
    load_q, to_bits = load_scalar[q_kind], store_scalar[cache_kind]
    mma, pack2 = make_mma(cache_kind), make_pack2(cache_kind)
    SPLIT_P = cache_kind == BF16
    options = {} if SIM or not max_registers else {"max_registers": max_registers}
    block_coords = make_block_coords(heads_major, G, GC)
    merge_states = make_merge_states(D, GC, NW, MAX_HEADS, True, split, out_kind, NT)

    @cuda.jit(device=True)
    def tile_pages(page_tables, s, tb, end):
        """Page ids of a tile's halves, tokens tb..tb+7 and tb+8..tb+15 (0 where past ``end``)."""
        pa = 0
        pb = 0
        if tb < end:
            pa = page_tables[s, tb >> PSHIFT]
        if P >= TILE:
            pb = pa
        elif tb + 8 < end:
            pb = page_tables[s, (tb + 8) >> PSHIFT]
        return pa, pb

    @cuda.jit(device=True)
    def load_run(dst, at, src, row, word, ok):
        """One token's run of 8 dims (two words from ``row + word``) into dst[at], dst[at + 1];
        zeros where the token or the dims lie outside what is read."""
        for x in range(2):
            val = uint64(0)
            if ok:
                val = src[row + uint64(word + x)]
            dst[at + x] = val

    @cuda.jit(**options)
    def paged_decode_tc_kernel(out, part_out, part_ml, q, k_flat, v_flat, page_tables, context_lens,
                               scale, window, part_tokens, page_words, token_words, head_words):
        s, kvh, h0, part = block_coords()
        tid = cuda.threadIdx.x
        w = tid >> 5
        grp = (tid & 31) >> 2
        tig = tid & 3
        scr = cuda.shared.array(SCR, uint32)

        # Q as the A operand: head grp's dims 32c + 8tig + 2x, +1 in qa[4c + x] (x = 2 * step + half).
        qa = cuda.local.array(N_Q, uint32)
        for c in range(DC):
            for x in range(4):
                d = 32 * c + 8 * tig + 2 * x
                word = ZERO32
                if grp < GC and d < D:
                    lo = uint32(to_bits(load_q(q[s, h0 + grp, d])))
                    hi = uint32(to_bits(load_q(q[s, h0 + grp, d + 1])))
                    word = lo | (hi << S16)
                qa[4 * c + x] = word

        pw, tw = uint64(page_words), uint64(token_words)
        head_off = uint64(kvh) * uint64(head_words)
        start, end = partition_range(context_lens[s], window, part, part_tokens)
        tb0 = (start >> 4) << 4
        rounds = (max(0, end - tb0) + TILE * NW - 1) // (TILE * NW)   # the same for every warp
        sl2 = float32(scale) * L2E
        m = NEG_INF      # running max of head grp's scores (log2 units)
        lsum = float32(0)  # this lane's share of head grp's softmax sum
        o = cuda.local.array(N_O, float32)
        for i in range(N_O):
            o[i] = float32(0)
        kr = cuda.local.array(N_K, uint64)
        vr = cuda.local.array(N_V, uint64)
        sc = cuda.local.array(4, float32)

        # Page ids run a round ahead: this round's K/V loads never wait on a page-table read.
        pa, pb = tile_pages(page_tables, s, tb0 + (w << 4), end)
        for r in range(rounds):
            tb = tb0 + ((r * NW + w) << 4)
            pa_next, pb_next = tile_pages(page_tables, s, tb + (NW << 4), end)   # the next round's tile
            base_a = uint64(pa) * pw + uint64(tb & (P - 1)) * tw + head_off          # tokens tb .. tb+7
            base_b = uint64(pb) * pw + uint64((tb + 8) & (P - 1)) * tw + head_off    # tokens tb+8 .. tb+15
            # K: tokens tb + grp and tb + 8 + grp, dims 32c + 8tig .. +8 (two words)
            for j in range(2):
                tok = tb + 8 * j + grp
                row = (base_a if j == 0 else base_b) + uint64(grp) * tw
                for c in range(DC):
                    load_run(kr, (j * DC + c) * 2, k_flat, row, 8 * c + 2 * tig,
                             tok >= start and tok < end and 32 * c + 8 * tig < D)
            # V: tokens tb + 2tig, +1, +8, +9, dims 64c + 8grp .. +8 (two words)
            for qq in range(4):
                rel = 2 * tig + (qq & 1) + 8 * (qq >> 1)
                tok = tb + rel
                row = (base_a if qq < 2 else base_b) + uint64(rel & 7) * tw
                for c in range(DV):
                    load_run(vr, (qq * DV + c) * 2, v_flat, row, 16 * c + 2 * grp,
                             tok >= start and tok < end and 64 * c + 8 * grp < D)
            # S = Q K^T, per 8 tokens: head grp's scores of tokens 2tig, 2tig+1 land in (d0, d1)
            for j in range(2):
                c0 = float32(0)
                c1 = float32(0)
                c2 = float32(0)
                c3 = float32(0)
                for c in range(DC):
                    for x in range(2):
                        kw = kr[(j * DC + c) * 2 + x]
                        c0, c1, c2, c3 = mma(qa[4 * c + 2 * x], ZERO32, qa[4 * c + 2 * x + 1], ZERO32,
                                             uint32(kw & LO32), uint32(kw >> S32), c0, c1, c2, c3, scr, tid)
                sc[2 * j] = c0
                sc[2 * j + 1] = c1
            # online softmax of head grp over the tile (its 16 scores sit in the lanes of one grp)
            mx = NEG_INF
            for e in range(4):
                tok = tb + 8 * (e >> 1) + 2 * tig + (e & 1)
                x = sc[e] * sl2
                if tok < start or tok >= end:
                    x = NEG_INF
                sc[e] = x
                mx = max(mx, x)
            mx = max(mx, shfl_xor(mx, 1, scr, tid))
            mx = max(mx, shfl_xor(mx, 2, scr, tid))
            mnew = max(m, mx)
            ms = mnew if mnew != NEG_INF else float32(0)   # no token yet: alpha = p = 0
            alpha = exp2(m - ms)
            m = mnew
            psum = float32(0)
            for e in range(4):
                p = exp2(sc[e] - ms)
                sc[e] = p
                psum += p
            lsum = lsum * alpha + psum
            al0 = shfl_idx(alpha, 8 * tig, scr, tid)        # the lanes of heads 2tig and 2tig+1
            al1 = shfl_idx(alpha, 8 * tig + 4, scr, tid)
            for i in range(4 * DV):
                o[4 * i] *= al0
                o[4 * i + 1] *= al1
                o[4 * i + 2] *= al0
                o[4 * i + 3] *= al1
            # O^T += V^T P^T, per 16 dims: dims 8grp + 2i (rows grp) and 8grp + 2i + 1 (rows grp + 8)
            pb0 = pack2(sc[0], sc[1])
            pb1 = pack2(sc[2], sc[3])
            if SPLIT_P:   # bf16 keeps 8 bits of p: add a second product of what rounding dropped
                pl0 = pack2(sc[0] - bits_to_f32(pb0 << S16), sc[1] - bits_to_f32(pb0 & HI16))
                pl1 = pack2(sc[2] - bits_to_f32(pb1 << S16), sc[3] - bits_to_f32(pb1 & HI16))
            for c in range(DV):
                for i in range(4):
                    wi = i >> 1
                    sh = uint64(32 * (i & 1))
                    x0 = uint32((vr[(0 * DV + c) * 2 + wi] >> sh) & LO32)
                    x1 = uint32((vr[(1 * DV + c) * 2 + wi] >> sh) & LO32)
                    x2 = uint32((vr[(2 * DV + c) * 2 + wi] >> sh) & LO32)
                    x3 = uint32((vr[(3 * DV + c) * 2 + wi] >> sh) & LO32)
                    k = 4 * (4 * c + i)
                    a0, a1 = (x0 & LO16) | (x1 << S16), (x0 >> S16) | (x1 & HI16)
                    a2, a3 = (x2 & LO16) | (x3 << S16), (x2 >> S16) | (x3 & HI16)
                    o[k], o[k + 1], o[k + 2], o[k + 3] = mma(a0, a1, a2, a3, pb0, pb1,
                                                             o[k], o[k + 1], o[k + 2], o[k + 3], scr, tid)
                    if SPLIT_P:
                        o[k], o[k + 1], o[k + 2], o[k + 3] = mma(a0, a1, a2, a3, pl0, pl1,
                                                                 o[k], o[k + 1], o[k + 2], o[k + 3], scr, tid)
            pa = pa_next
            pb = pb_next

        # ---- merge the warps' states through shared memory ----
        lsum += shfl_xor(lsum, 1, scr, tid)
        lsum += shfl_xor(lsum, 2, scr, tid)
        sm_m = cuda.shared.array(SM_ML, float32)
        sm_l = cuda.shared.array(SM_ML, float32)
        sm_o = cuda.shared.array(SM_O, float32)
        if tig == 0:
            sm_m[w * MAX_HEADS + grp] = m
            sm_l[w * MAX_HEADS + grp] = lsum
        for c in range(DV):
            for i in range(4):
                d = 64 * c + 8 * grp + 2 * i
                if d < D:
                    k = 4 * (4 * c + i)
                    for e in range(4):
                        sm_o[(w * MAX_HEADS + 2 * tig + (e & 1)) * D + d + (e >> 1)] = o[k + e]
        cuda.syncthreads()   # every warp's state is in shared memory
        merge_states(out, part_out, part_ml, sm_m, sm_l, sm_o, s, h0, part, tid)

    return paged_decode_tc_kernel
