"""Token sampling on the GPU without sorting the vocabulary: greedy, temperature, top-k, top-p,
min-p, one block per row, every row of a step in one launch (kernels/reference_sampling.py is the
specification).

A row is read a few times from global memory and never sorted whole:

    greedy, or temperature alone   one pass: argmax of z (+ Gumbel noise); rows are split over
                                   several blocks when there are few of them
    with min-p / top-k / top-p     pass A: max z, the softmax sum and bounds that keep all but
                                   the few tokens that can matter out of the histograms (see
                                   ``cut_distance``); then the thresholds by radix selection on
                                   d = max z - z (>= 0, so its float bits order like d): 11-bit
                                   digits, a histogram of counts (top-k) and fixed-point masses
                                   exp(-d) * 2^32 (top-p) per level in shared memory; then one
                                   pass drawing argmax of (Gumbel - d) over the kept tokens

As soon as the candidates left (every token whose key is at most the current digit's bin) fit
``CAP``, they are gathered into shared memory, sorted there, and the remaining thresholds and the
draw are finished without another pass over the row: for top-k 50 that is usually after the first
histogram. top-p's threshold is exact in its fixed-point masses: integer sums, so the result does
not depend on the order of atomic adds. Masses below 2^-32 of the top token's count as zero.

Randomness: Philox4x32-10 keyed by the row's seed, counter (i // 4, position, 0, 0), word i % 4
for token i; u = (top 23 bits + 1/2) * 2^-23 lies strictly inside (0, 1).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32, uint64

from pagemem.kernels._arrays import as_device, launch, num_sms
from pagemem.kernels._device import SIM, bits_dtype, bits_to_f32, dtype_kind, f32_to_bits, make_block_reduce
from pagemem.kernels.reference_sampling import MIN_P, POSITION, SEED_HI, SEED_LO, TEMPERATURE, TOP_K, TOP_P
from pagemem.kernels.sampling_device import (INF, MASK, SH32, dist, gumbel, make_block_ops, make_quad_load, make_row_scan,
                                             mass_of, order_key, philox, pick, quad_mode, token_of, word_of)

THREADS = 256
NB = 2048                                   # histogram bins: one 11-bit digit
CAP = 2048                                  # candidates finished in shared memory (a power of two)
MAX_SPLIT = 16                              # blocks sharing one row on the one-pass path
# uint64 words a thread has in flight in each pass of the filtered kernel (the one-pass kernel:
# TILE_WORDS): as many as its 128 registers a thread hold without spilling (ptxas, sm_90, fp16
# and fp32 logits); the gather's atomics and stores leave it the fewest.
TILE_SOFTMAX, TILE_HISTOGRAM, TILE_GATHER, TILE_DRAW = 4, 8, 2, 4
# Radix levels over the 32-bit keys: digits of 11, 11 and 10 bits (shifts 21, 10, 0), top first.


def _dev(fn):
    # a device function under the simulator too, so that it sees the simulator's cuda module
    return cuda.jit(device=True)(fn)


@functools.cache
def make_sample_kernel(logit_kind: int, mode: int, threads: int = THREADS, cap: int = CAP):
    """(one_pass_kernel, sample_kernel, logprobs_kernel) for logits of ``logit_kind`` read in
    quads of ``mode``.

    one_pass_kernel(best, words, bits, params, vocab, split), grid=(n, split), then
    sample_kernel(best, words, bits, params, vocab), grid=n: each writes the rows of its kind, so
    that the key of row r's drawn token (``order_key``; token_of() gives the id) is atomically
    max-ed into ``best`` [n] uint64 (zeroed by the caller). block=threads (a power of two in
    [32, NB]); one-pass rows spread their quads over ``split`` blocks; the lean one-pass kernel
    keeps many warps an SM, the filtered one two blocks.
    ``cap`` (a power of two in [threads, CAP]; smaller in tests, to reach the radix levels on
    small rows) bounds the candidates finished in shared memory. Control flow is uniform across
    a block: branches depend on the row's settings or on values broadcast through shared memory
    after a barrier. Math in float32; masses in uint64.
    """
    NT, CAP_ = threads, cap
    if NT & (NT - 1) or not 32 <= NT <= NB:
        raise ValueError(f"threads must be a power of two in [32, {NB}], got {threads}")
    if cap & (cap - 1) or not NT <= cap <= CAP:
        raise ValueError(f"cap must be a power of two in [threads, {CAP}], got {cap}")
    C = NB // NT                       # bins a thread scans
    PER = CAP_ // NT                   # candidates a thread sums in order
    quad = make_quad_load(logit_kind, mode)
    block_max_f = make_block_reduce(NT, True)
    block_sum_f = make_block_reduce(NT, False)
    block_max_u64, block_excl_scan, kth_largest = make_block_ops(NT)

    @_dev
    def softmax_body(x0, x1, x2, x3, q, state, ctx):
        """(running max, sum of exp(z - max)) with quad q's z = x * inv_t in."""
        m, s = state
        vocab, inv_t = ctx
        for e in range(4):
            if 4 * q + e < vocab:
                z = pick(x0, x1, x2, x3, e) * inv_t
                if z > m:
                    s = s * math.exp(m - z) + float32(1)
                    m = z
                else:
                    s += math.exp(z - m)
        return m, s

    softmax_scan = make_row_scan(logit_kind, mode, softmax_body, TILE_SOFTMAX)

    @_dev
    def softmax_stats(words, bits, r, vocab, inv_t, sf, tid):
        """(max z of the row, sum of exp(z - max), this thread's own max z)."""
        m, s = softmax_scan(words, bits, r, vocab, tid, NT, (-INF, float32(0)), (vocab, inv_t))
        zmax = block_max_f(m, sf, tid)
        w = s * math.exp(m - zmax) if m > -INF else float32(0)
        return zmax, block_sum_f(w, sf, tid), m

    @_dev
    def cut_distance(own_max, zmax, total, vocab, top_k, top_p, need_k, need_p, dmp, sf, sfk, tid):
        """A distance past which no token can be kept, so histograms skip it. top-k: at least k
        tokens are at least the k-th largest of the threads' own maxima. top-p alone: the tokens
        past D hold at most vocab * e^-D of the top token's mass, below (1 - top_p) of the total
        once D = log(vocab / ((1 - top_p) * total)); one unit of slack covers rounding."""
        cut = dmp
        if need_k and top_k <= NT:
            mk = kth_largest(own_max, top_k, sf, sfk, tid)
            cut = min(cut, (zmax - mk) * float32(1.000001) + float32(1e-6))
        elif need_p and not need_k:
            dp = math.log(float32(vocab)) - math.log((float32(1) - top_p) * total) + float32(1)
            cut = min(cut, max(dp, float32(0)))
        return cut

    @_dev
    def histogram_body(x0, x1, x2, x3, q, outside, ctx):
        """Count quad q's considered tokens into the histogram; add to ``outside`` the mass of
        those past the cut but within min-p."""
        vocab, inv_t, zmax, cut, dmp, limit, prefix, pmask, shift, dmask, hcount, hmass = ctx
        for e in range(4):
            if 4 * q + e < vocab:
                d = dist(pick(x0, x1, x2, x3, e), inv_t, zmax)
                key = uint64(f32_to_bits(d))
                if d <= cut:
                    if key <= limit and (key & pmask) == prefix:
                        b = (key >> shift) & dmask
                        cuda.atomic.add(hcount, b, uint32(1))
                        cuda.atomic.add(hmass, b, mass_of(d))
                elif d <= dmp and key <= limit:
                    outside += mass_of(d)
        return outside

    histogram_scan = make_row_scan(logit_kind, mode, histogram_body, TILE_HISTOGRAM)

    @_dev
    def histogram(words, bits, r, vocab, inv_t, zmax, cut, dmp, limit, prefix, pmask, shift, dmask,
                  hcount, hmass, tid):
        """Counts and masses of the tokens with d <= cut and key <= limit whose key matches
        ``prefix`` on ``pmask``, by the digit at ``shift``. Returns this thread's mass of the
        tokens past the cut but within min-p (top-p's total counts them)."""
        for b in range(tid, NB, NT):
            hcount[b] = uint32(0)
            hmass[b] = uint64(0)
        cuda.syncthreads()  # bins cleared
        outside = histogram_scan(words, bits, r, vocab, tid, NT, uint64(0),
                                 (vocab, inv_t, zmax, cut, dmp, limit, prefix, pmask, shift, dmask, hcount, hmass))
        cuda.syncthreads()  # histogram complete
        return outside

    @_dev
    def find_bin(hcount, hmass, use_mass, target, before_c, before_m, scan, sv, tid):
        """The first bin at which the running count (or mass), after before_c (before_m), reaches
        target: (bin or NB when never reached, count and mass below it, count and mass in it)."""
        tc = uint64(0)
        tm = uint64(0)
        for j in range(C):
            tc += uint64(hcount[tid * C + j])
            tm += hmass[tid * C + j]
        if tid == 0:
            sv[0] = uint64(NB)
            sv[1] = uint64(0)
            sv[2] = uint64(0)
            sv[3] = uint64(0)
            sv[4] = uint64(0)
        ec, unused = block_excl_scan(tc, scan, tid)   # barriers: sv written before it is read
        em, unused = block_excl_scan(tm, scan, tid)
        acc_c = before_c + ec
        acc_m = before_m + em
        mine = tm if use_mass else tc
        start = acc_m if use_mass else acc_c
        if start < target and start + mine >= target:   # exactly one thread holds the crossing
            for j in range(C):
                b = tid * C + j
                cb = uint64(hcount[b])
                mb = hmass[b]
                if (acc_m + mb if use_mass else acc_c + cb) >= target:
                    sv[0] = uint64(b)
                    sv[1] = acc_c - before_c
                    sv[2] = acc_m - before_m
                    sv[3] = cb
                    sv[4] = mb
                    break
                acc_c += cb
                acc_m += mb
        cuda.syncthreads()  # the crossing is published
        res = (sv[0], sv[1], sv[2], sv[3], sv[4])
        cuda.syncthreads()  # read before sv is reused
        return res

    @_dev
    def gather_body(x0, x1, x2, x3, q, state, ctx):
        """Append quad q's considered tokens whose key is at most hi_key to the candidates."""
        vocab, inv_t, zmax, cut, hi_key, cand, sv = ctx
        for e in range(4):
            if 4 * q + e < vocab:
                d = dist(pick(x0, x1, x2, x3, e), inv_t, zmax)
                key = uint64(f32_to_bits(d))
                if d <= cut and key <= hi_key:
                    at = cuda.atomic.add(sv, 5, uint64(1))
                    if at < uint64(CAP_):
                        cand[at] = (key << SH32) | uint64(4 * q + e)
        return state

    gather_scan = make_row_scan(logit_kind, mode, gather_body, TILE_GATHER)

    @_dev
    def gather(words, bits, r, vocab, inv_t, zmax, cut, hi_key, cand, sv, tid):
        """cand[:n] = (key << 32 | id) of every token with d <= cut and key <= hi_key, the rest
        padded with the largest value, then sorted (bitonic). Callers know from a histogram that
        n <= cap (were it more, which tokens got in would depend on the order of atomics)."""
        if tid == 0:
            sv[5] = uint64(0)
        for i in range(tid, CAP_, NT):
            cand[i] = ~uint64(0)
        cuda.syncthreads()  # counter and padding ready
        gather_scan(words, bits, r, vocab, tid, NT, int64(0), (vocab, inv_t, zmax, cut, hi_key, cand, sv))
        cuda.syncthreads()  # all gathered
        n = min(int64(sv[5]), int64(CAP_))
        size = 2
        while size < n:
            size <<= 1
        k = 2
        while k <= size:
            j = k >> 1
            while j > 0:
                for i in range(tid, size, NT):
                    p = i ^ j
                    if p > i:
                        a = cand[i]
                        b = cand[p]
                        if (a > b) == ((i & k) == 0):
                            cand[i] = b
                            cand[p] = a
                cuda.syncthreads()  # one compare-exchange stage done
                j >>= 1
            k <<= 1
        return n

    @_dev
    def upper_bound(cand, n, key, sv, tid):
        """Number of sorted candidates (of n) whose key is <= key."""
        if tid == 0:
            sv[6] = uint64(0)
        cuda.syncthreads()  # slot cleared
        for i in range(tid, n, NT):
            if (cand[i] >> SH32) <= key and (i + 1 == n or (cand[i + 1] >> SH32) > key):
                sv[6] = uint64(i + 1)
        cuda.syncthreads()  # the bound is published
        out = int64(sv[6])
        cuda.syncthreads()  # read before reuse
        return out

    @_dev
    def finish_in_shared(cand, n, top_k, need_k, top_p, need_p, total_m, pos, k0, k1, scan, sv, tid):
        """Thresholds still open (top-k when ``need_k``, then top-p over what it kept, whose mass
        is ``total_m`` when top-k is not open) and the draw, over the n sorted candidates.
        Returns the winner's order key."""
        L = n
        if need_k and top_k < n:
            L = upper_bound(cand, n, cand[top_k - 1] >> SH32, sv, tid)
        if need_p:
            tm = uint64(0)
            for j in range(PER):
                i = tid * PER + j
                if i < L:
                    tm += mass_of(bits_to_f32(cand[i] >> SH32))
            em, m_all = block_excl_scan(tm, scan, tid)
            total = m_all if need_k else total_m
            target = max(uint64(1), uint64(math.ceil(float64(top_p) * float64(total))))
            if tid == 0:
                sv[7] = uint64(L)
            cuda.syncthreads()  # default: no cut
            if em < target:     # the one thread whose chunk holds the crossing, if any
                acc = em
                for j in range(PER):
                    i = tid * PER + j
                    if i < L:
                        acc += mass_of(bits_to_f32(cand[i] >> SH32))
                        if acc >= target:
                            sv[7] = uint64(i)
                            break
            cuda.syncthreads()  # crossing published
            cut = int64(sv[7])
            cuda.syncthreads()  # read before reuse
            if cut < L:
                L = upper_bound(cand, n, cand[cut] >> SH32, sv, tid)
        best = uint64(0)
        for i in range(tid, L, NT):
            c = cand[i]
            tok = c & MASK
            best = max(best, order_key(gumbel(word_of(tok, pos, k0, k1)) - bits_to_f32(c >> SH32), tok))
        return block_max_u64(best, sv, 8, tid)

    @_dev
    def one_pass_body(x0, x1, x2, x3, q, best, ctx):
        """best, or the largest order key of quad q's tokens by z + Gumbel noise (z alone when
        greedy) if larger."""
        vocab, inv_t, greedy, pos, k0, k1 = ctx
        w0, w1, w2, w3 = (uint64(0), uint64(0), uint64(0), uint64(0))
        if not greedy:
            w0, w1, w2, w3 = philox(uint64(q), pos, uint64(0), uint64(0), k0, k1)
        for e in range(4):
            i = 4 * q + e
            if i < vocab:
                v = pick(x0, x1, x2, x3, e) * inv_t
                if not greedy:
                    v += gumbel(pick(w0, w1, w2, w3, e))
                best = max(best, order_key(v, i))
        return best

    one_pass_scan = make_row_scan(logit_kind, mode, one_pass_body)

    @_dev
    def one_pass(words, bits, r, vocab, inv_t, greedy, pos, k0, k1, part, split, tid):
        """This block's share of argmax(z + Gumbel noise), or of argmax(z) when greedy."""
        return one_pass_scan(words, bits, r, vocab, part * NT + tid, NT * split, uint64(0),
                             (vocab, inv_t, greedy, pos, k0, k1))

    @_dev
    def draw_body(x0, x1, x2, x3, q, best, ctx):
        """best, or the largest order key of (Gumbel - d) over quad q's considered tokens if
        larger. The noise is drawn only for a quad that holds one (most hold none once a cut is
        known)."""
        vocab, inv_t, zmax, cut, limit, pos, k0, k1 = ctx
        d0 = dist(x0, inv_t, zmax)
        d1 = dist(x1, inv_t, zmax)
        d2 = dist(x2, inv_t, zmax)
        d3 = dist(x3, inv_t, zmax)
        if min(min(d0, d1), min(d2, d3)) <= cut:
            w0, w1, w2, w3 = philox(uint64(q), pos, uint64(0), uint64(0), k0, k1)
            for e in range(4):
                i = 4 * q + e
                d = pick(d0, d1, d2, d3, e)
                if i < vocab and d <= cut and uint64(f32_to_bits(d)) <= limit:
                    best = max(best, order_key(gumbel(pick(w0, w1, w2, w3, e)) - d, i))
        return best

    draw_scan = make_row_scan(logit_kind, mode, draw_body, TILE_DRAW)

    @_dev
    def draw_pass(words, bits, r, vocab, inv_t, zmax, cut, limit, pos, k0, k1, tid):
        """argmax of (Gumbel - d) over the tokens with d <= cut and key <= limit."""
        return draw_scan(words, bits, r, vocab, tid, NT, uint64(0), (vocab, inv_t, zmax, cut, limit, pos, k0, k1))

    # Two blocks an SM for the filtered path (its shared memory allows it); the one-pass kernel
    # holds few registers and needs no cap.
    jit = cuda.jit if SIM else cuda.jit(max_registers=max(32, min(255, 32768 // NT)))

    @_dev
    def row_settings(params, r, vocab):
        """(greedy, inv_t, filtered, top_k, top_p, min_p, k0, k1, pos) of row r."""
        temp = bits_to_f32(params[TEMPERATURE, r])
        top_k = params[TOP_K, r]
        top_p = bits_to_f32(params[TOP_P, r])
        min_p = bits_to_f32(params[MIN_P, r])
        greedy = temp == float32(0) or top_k == 1
        inv_t = float32(1) if greedy else float32(1) / temp
        filtered = not greedy and ((top_k > 0 and top_k < vocab) or top_p < float32(1) or min_p > float32(0))
        k0 = uint64(params[SEED_LO, r]) & MASK
        k1 = uint64(params[SEED_HI, r]) & MASK
        pos = uint64(params[POSITION, r]) & MASK
        return greedy, inv_t, filtered, top_k, top_p, min_p, k0, k1, pos

    @cuda.jit
    def one_pass_kernel(best_out, words, bits, params, vocab, split):
        # best_out: [n] uint64 (zeroed); words: [n, W] uint64 or bits again; bits: [n, V] (raw
        # bits for 16-bit kinds); params: [NUM_FIELDS, n] int32. Grid (n, split): rows that
        # draw in one pass (greedy, or temperature alone); the others exit at once.
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        sv = cuda.shared.array(16, uint64)
        greedy, inv_t, filtered, top_k, top_p, min_p, k0, k1, pos = row_settings(params, r, vocab)
        if filtered:
            return
        key = block_max_u64(one_pass(words, bits, r, vocab, inv_t, greedy, pos, k0, k1, cuda.blockIdx.y, split, tid),
                            sv, 8, tid)
        if tid == 0:
            cuda.atomic.max(best_out, r, key)

    @jit
    def sample_kernel(best_out, words, bits, params, vocab):
        # As one_pass_kernel, for the rows with top-k, top-p or min-p: grid n, one block a row.
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        hcount = cuda.shared.array(NB, uint32)
        cand = cuda.shared.array(CAP, uint64)      # candidates; also the mass histogram
        scan = cuda.shared.array(NT, uint64)
        sv = cuda.shared.array(16, uint64)
        sf = cuda.shared.array(NT, float32)
        sfk = cuda.shared.array(1, float32)
        greedy, inv_t, filtered, top_k, top_p, min_p, k0, k1, pos = row_settings(params, r, vocab)
        if not filtered:
            return
        need_k = top_k > 0 and top_k < vocab
        need_p = top_p < float32(1)
        need_m = min_p > float32(0)

        zmax, total, own_max = softmax_stats(words, bits, r, vocab, inv_t, sf, tid)
        dmp = -math.log(min_p) if need_m else INF
        cut = cut_distance(own_max, zmax, total, vocab, top_k, top_p, need_k, need_p, dmp, sf, sfk, tid)

        # ---- thresholds: top-k (a count) first, then top-p (a mass) among what it kept ----
        limit = MASK                    # keys above it are out (an exact threshold found before)
        total_m = uint64(0)             # top-p: mass of the considered tokens under ``limit``
        n = int64(-1)                   # candidates gathered into shared memory (-1: none)
        open_k = need_k
        for goal in range(2):
            use_mass = goal == 1
            if n >= 0 or (goal == 0 and not need_k) or (goal == 1 and not need_p):
                continue
            prefix = uint64(0)
            pmask = uint64(0)
            bc = uint64(0)
            bm = uint64(0)
            target = uint64(top_k)
            for level in range(3):
                shift = uint64(21 - 11 * level) if level < 2 else uint64(0)
                dmask = uint64(0x7FF) if level < 2 else uint64(0x3FF)
                outside = histogram(words, bits, r, vocab, inv_t, zmax, cut, dmp, limit, prefix, pmask, shift,
                                    dmask, hcount, cand, tid)
                if use_mass and level == 0:
                    tm = outside
                    for j in range(C):
                        tm += cand[tid * C + j]
                    unused, total_m = block_excl_scan(tm, scan, tid)
                    target = max(uint64(1), uint64(math.ceil(float64(top_p) * float64(total_m))))
                b, cb, mb, nb, mbin = find_bin(hcount, cand, use_mass, target, bc, bm, scan, sv, tid)
                if b == uint64(NB):     # never reached: every considered token under limit stays
                    break
                if bc + cb + nb <= uint64(CAP_):   # few enough: finish in shared memory
                    hi_key = prefix | (b << shift) | ((uint64(1) << shift) - uint64(1))
                    n = gather(words, bits, r, vocab, inv_t, zmax, cut, min(hi_key, limit), cand, sv, tid)
                    break
                prefix = prefix | (b << shift)
                pmask = pmask | (dmask << shift)
                bc += cb
                bm += mb
                if level == 2:          # exact: the threshold's key is ``prefix``
                    limit = prefix
            if goal == 0 and n < 0:
                open_k = False

        if n >= 0:
            key = finish_in_shared(cand, n, top_k, open_k, top_p, need_p, total_m, pos, k0, k1, scan, sv, tid)
        else:
            key = block_max_u64(draw_pass(words, bits, r, vocab, inv_t, zmax, cut, limit, pos, k0, k1, tid),
                                sv, 8, tid)
        if tid == 0:
            cuda.atomic.max(best_out, r, key)

    @_dev
    def select_count(words, bits, r, vocab, inv_t, zmax, cut, num, hcount, cand, scan, sv, tid):
        """The ``num`` smallest keys (largest z) among d <= cut: (n, key). n >= 0: cand[:n] holds,
        sorted, every token with key <= a bound that keeps at least num of them; n < 0: more than
        cap tokens share the bound, whose exact key is returned."""
        prefix = uint64(0)
        pmask = uint64(0)
        bc = uint64(0)
        bm = uint64(0)
        for level in range(3):
            shift = uint64(21 - 11 * level) if level < 2 else uint64(0)
            dmask = uint64(0x7FF) if level < 2 else uint64(0x3FF)
            histogram(words, bits, r, vocab, inv_t, zmax, cut, cut, MASK, prefix, pmask, shift, dmask, hcount, cand, tid)
            b, cb, mb, nb, mbin = find_bin(hcount, cand, False, uint64(num), bc, bm, scan, sv, tid)
            if bc + cb + nb <= uint64(CAP_):
                hi_key = prefix | (b << shift) | ((uint64(1) << shift) - uint64(1))
                return gather(words, bits, r, vocab, inv_t, zmax, cut, hi_key, cand, sv, tid), prefix
            prefix = prefix | (b << shift)
            pmask = pmask | (dmask << shift)
            bc += cb
            bm += mb
        return int64(-1), prefix

    @jit
    def logprobs_kernel(chosen, top_ids, top_lp, words, bits, params, tokens, vocab, num_top):
        # chosen: [n] f32; top_ids: [n, >= num_top] int32; top_lp: [n, >= num_top] f32
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        hcount = cuda.shared.array(NB, uint32)
        cand = cuda.shared.array(CAP, uint64)
        scan = cuda.shared.array(NT, uint64)
        sv = cuda.shared.array(16, uint64)
        sf = cuda.shared.array(NT, float32)
        sfk = cuda.shared.array(1, float32)
        temp = bits_to_f32(params[TEMPERATURE, r])
        inv_t = float32(1) / temp if temp > float32(0) else float32(1)
        zmax, total, own_max = softmax_stats(words, bits, r, vocab, inv_t, sf, tid)
        log_sum = math.log(total)
        if tid == 0:
            tok = tokens[r]
            x0, x1, x2, x3 = quad(words, bits, r, tok // 4, vocab)
            chosen[r] = -dist(pick(x0, x1, x2, x3, tok % 4), inv_t, zmax) - log_sum
        if num_top == 0:
            return
        mk = kth_largest(own_max, num_top, sf, sfk, tid)
        cut = (zmax - mk) * float32(1.000001) + float32(1e-6)
        n, key = select_count(words, bits, r, vocab, inv_t, zmax, cut, num_top, hcount, cand, scan, sv, tid)
        if n >= 0:
            for j in range(tid, min(n, int64(num_top)), NT):
                top_ids[r, j] = int32(cand[j] & MASK)
                top_lp[r, j] = -bits_to_f32(cand[j] >> SH32) - log_sum
            return
        # More than cap tokens tie at the bound: the strictly smaller keys first (fewer than
        # num_top), then the tied tokens with the lowest ids, found in id order, tile by tile.
        below = int64(0)
        if key > uint64(0):
            below = gather(words, bits, r, vocab, inv_t, zmax, cut, key - uint64(1), cand, sv, tid)
        for j in range(tid, below, NT):
            top_ids[r, j] = int32(cand[j] & MASK)
            top_lp[r, j] = -bits_to_f32(cand[j] >> SH32) - log_sum
        filled = below
        tie_lp = -bits_to_f32(key) - log_sum
        for base in range(0, vocab, NT):
            if filled >= num_top:        # block-uniform: ``filled`` comes from a block scan
                break
            i = base + tid
            hit = uint64(0)
            if i < vocab:
                x0, x1, x2, x3 = quad(words, bits, r, i // 4, vocab)
                if uint64(f32_to_bits(dist(pick(x0, x1, x2, x3, i % 4), inv_t, zmax))) == key:
                    hit = uint64(1)
            rank, count = block_excl_scan(hit, scan, tid)
            if hit and filled + int64(rank) < num_top:
                top_ids[r, filled + int64(rank)] = int32(i)
                top_lp[r, filled + int64(rank)] = tie_lp
            filled += int64(count)

    return one_pass_kernel, sample_kernel, logprobs_kernel


@cuda.jit
def finish_kernel(out, best):
    """out[r] = the token id held in row r's order key."""
    r = cuda.grid(1)
    if r < out.shape[0]:
        out[r] = token_of(best[r])


def _views(logits):
    """(mode, words view, bits view) of logits [n, V]: uint64 words when rows are 8-byte aligned."""
    kind = dtype_kind(logits.dtype, "logits")
    bits = as_device(logits, bits_dtype(kind))
    row_bytes = logits.strides[0]
    ptr = logits.__array_interface__["data"][0] if isinstance(logits, np.ndarray) else logits.data.ptr
    aligned = row_bytes % 8 == 0 and ptr % 8 == 0 and logits.shape[1] * logits.itemsize % 8 == 0
    mode = quad_mode(kind, aligned)
    return kind, mode, (as_device(logits, np.uint64) if aligned else bits), bits


def default_split(num_rows: int) -> int:
    """Blocks per row on the one-pass path: enough for two blocks an SM, at most MAX_SPLIT."""
    if SIM:
        return 1
    return max(1, min(MAX_SPLIT, -(-2 * num_sms() // num_rows)))


def sample_cuda(logits, params, out, stream, threads: int = THREADS, cap: int = CAP, split: int | None = None):
    """Enqueue one draw per row (checked arguments: see ``pagemem.kernels.sample``); returns out."""
    kind, mode, words, bits = _views(logits)
    n = logits.shape[0]
    split = default_split(n) if split is None else split
    if isinstance(logits, np.ndarray):
        best = np.zeros(n, np.uint64)
    else:
        import cupy as cp
        with stream if stream is not None else cp.cuda.get_current_stream():
            best = cp.zeros(n, np.uint64)        # a memset on the launch stream
    one_pass, filtered = make_sample_kernel(kind, mode, threads, cap)[:2]
    args = (as_device(best), words, bits, as_device(params), logits.shape[1])
    launch(one_pass, (n, split), threads, stream, *args, split)
    launch(filtered, n, threads, stream, *args)
    launch(finish_kernel, -(-n // 128), 128, stream, as_device(out), as_device(best))
    return out


def logprobs_cuda(logits, params, token_ids, num_top: int, chosen, top_ids, top_lp, stream,
                  threads: int = THREADS, cap: int = CAP):
    """Enqueue the log-probabilities of ``token_ids`` and the ``num_top`` largest per row."""
    kind, mode, words, bits = _views(logits)
    kernel = make_sample_kernel(kind, mode, threads, cap)[2]
    launch(kernel, logits.shape[0], threads, stream, as_device(chosen), as_device(top_ids), as_device(top_lp),
           words, bits, as_device(params), as_device(token_ids), logits.shape[1], num_top)
