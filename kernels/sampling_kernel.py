"""Token sampling on the GPU without sorting the vocabulary: greedy, temperature, top-k, top-p,
min-p, one block per row, every row of a step in one launch (kernels/reference_sampling.py is the
specification).

A row is read a few times from global memory and never sorted whole:

    greedy, or temperature alone   one pass: argmax of z (+ Gumbel noise)
    with min-p / top-k / top-p     pass A: max z; then the thresholds by radix selection on
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

from numba import cuda, float32, float64, int32, int64, uint32, uint64

from pagemem.kernels._arrays import as_device, launch
from pagemem.kernels._device import SIM, bits_dtype, bits_to_f32, dtype_kind, f32_to_bits, load_scalar, make_block_reduce
from pagemem.kernels.reference_sampling import MIN_P, POSITION, SEED_HI, SEED_LO, TEMPERATURE, TOP_K, TOP_P

THREADS = 512
NB = 2048                                   # histogram bins: one 11-bit digit
# Radix levels over the 32-bit keys: digits of 11, 11 and 10 bits (shifts 21, 10, 0), top first.
CAP = 2048                                  # candidates finished in shared memory (a power of two)

_MASK32 = 0xFFFFFFFF


def _dev(fn):
    return fn if SIM else cuda.jit(device=True)(fn)


M0, M1, W0, W1 = uint64(0xD2511F53), uint64(0xCD9E8D57), uint64(0x9E3779B9), uint64(0xBB67AE85)
MASK = uint64(_MASK32)
SH32 = uint64(32)


@_dev
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values held in uint64: four output words."""
    for r in range(10):
        if r > 0:
            k0 = (k0 + W0) & MASK
            k1 = (k1 + W1) & MASK
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> SH32) ^ c1 ^ k0, p1 & MASK, (p0 >> SH32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


@_dev
def gumbel(word):
    """Gumbel(0, 1) noise from one 32-bit word."""
    u = (float32(word >> uint64(9)) + float32(0.5)) * float32(2.0 ** -23)
    return -math.log(-math.log(u))


@_dev
def word_of(i, pos, k0, k1):
    """Token i's random word (one Philox call: used where tokens are visited one at a time)."""
    w0, w1, w2, w3 = philox(uint64(i) >> uint64(2), pos, uint64(0), uint64(0), k0, k1)
    e = i & 3
    return w0 if e == 0 else (w1 if e == 1 else (w2 if e == 2 else w3))


@_dev
def order_key(v, i):
    """uint64 whose order is v's (float32), then the lower token id: argmax by max()."""
    b = uint64(f32_to_bits(v))
    if b & uint64(0x80000000):
        b = (~b) & MASK
    else:
        b = b | uint64(0x80000000)
    return (b << SH32) | (MASK - uint64(i))


@_dev
def mass_of(d):
    """Fixed-point probability mass relative to the top token: exp(-d) * 2^32, truncated."""
    return uint64(math.exp(-d) * float32(4294967296.0))


@functools.cache
def make_sample_kernel(logit_kind: int, threads: int = THREADS, cap: int = CAP):
    """One token per row of ``logits`` [n, V] (bits for 16-bit kinds) under ``params``
    [NUM_FIELDS, n] int32 (kernels/reference_sampling.py), written to ``out`` [n] int32.

    Launch: grid=n, block=threads (a power of two, at least 32 and at most NB); ``cap`` (a power
    of two, at most CAP: smaller in tests, to reach the radix levels on small rows) bounds the
    candidates finished in shared memory. Control flow is
    uniform across a block: every branch depends on the row's settings or on values broadcast
    through shared memory after a barrier. Accumulation in float32; masses in uint64.
    """
    NT, CAP_ = threads, cap
    if NT & (NT - 1) or not 32 <= NT <= NB:
        raise ValueError(f"threads must be a power of two in [32, {NB}], got {threads}")
    if cap & (cap - 1) or not NT <= cap <= CAP:
        raise ValueError(f"cap must be a power of two in [threads, {CAP}], got {cap}")
    C = NB // NT                       # bins a thread scans
    PER = CAP_ // NT                   # candidates a thread sums in order
    load = load_scalar[logit_kind]
    block_max_f = make_block_reduce(NT, True)
    INF = float32(math.inf)

    @_dev
    def block_max_u64(v, sv, slot, tid):
        """Max of v over the block, through one shared slot (atomics: any thread order)."""
        if tid == 0:
            sv[slot] = uint64(0)
        cuda.syncthreads()  # slot cleared before anyone adds to it
        cuda.atomic.max(sv, slot, v)
        cuda.syncthreads()  # every thread's value is in
        out = sv[slot]
        cuda.syncthreads()  # read before the slot is reused
        return out

    @_dev
    def block_excl_scan(v, scan, tid):
        """(exclusive prefix sum of v over thread ids, block total): Hillis-Steele in shared."""
        scan[tid] = v
        cuda.syncthreads()  # all values in
        off = 1
        while off < NT:
            t = uint64(0)
            if tid >= off:
                t = scan[tid - off]
            cuda.syncthreads()  # everyone read this level before it is overwritten
            scan[tid] += t
            cuda.syncthreads()  # level written
            off <<= 1
        incl = scan[tid]
        total = scan[NT - 1]
        cuda.syncthreads()  # read before scan is reused
        return incl - v, total

    @_dev
    def histogram(logits, r, vocab, inv_t, zmax, dmp, limit, prefix, pmask, shift, dmask, hcount, hmass, tid):
        """Counts and masses of the considered tokens (d <= dmp, key <= limit) whose key matches
        ``prefix`` on ``pmask``, by the digit at ``shift``."""
        for b in range(tid, NB, NT):
            hcount[b] = uint32(0)
            hmass[b] = uint64(0)
        cuda.syncthreads()  # bins cleared
        for i in range(tid, vocab, NT):
            d = zmax - load(logits[r, i]) * inv_t
            if d <= dmp:
                key = uint64(f32_to_bits(d))
                if key <= limit and (key & pmask) == prefix:
                    b = (key >> shift) & dmask
                    cuda.atomic.add(hcount, b, uint32(1))
                    cuda.atomic.add(hmass, b, mass_of(d))
        cuda.syncthreads()  # histogram complete

    @_dev
    def find_bin(hcount, hmass, use_mass, target, before_c, before_m, scan, sv, tid):
        """The first bin at which the running count (or mass), after before_c (before_m), reaches
        target. Returns (bin or NB when never reached, count and mass below that bin, count and
        mass in it), the same in every thread."""
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
                step = mb if use_mass else cb
                if (acc_m if use_mass else acc_c) + step >= target:
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
    def gather(logits, r, vocab, inv_t, zmax, dmp, hi_key, cand, sv, tid):
        """cand[:n] = (key << 32 | id) of every considered token with key <= hi_key, the rest
        padded with the largest value, then sorted. Callers know from a histogram that n <= CAP
        (were it more, which tokens got in would depend on the order of atomics)."""
        if tid == 0:
            sv[5] = uint64(0)
        for i in range(tid, CAP_, NT):
            cand[i] = ~uint64(0)
        cuda.syncthreads()  # counter and padding ready
        for i in range(tid, vocab, NT):
            d = zmax - load(logits[r, i]) * inv_t
            if d <= dmp:
                key = uint64(f32_to_bits(d))
                if key <= hi_key:
                    at = cuda.atomic.add(sv, 5, uint64(1))
                    if at < uint64(CAP_):
                        cand[at] = (key << SH32) | uint64(i)
        cuda.syncthreads()  # all gathered
        n = min(int64(sv[5]), int64(CAP_))
        size = 2
        while size < n:
            size <<= 1
        # bitonic sort of cand[:size] ascending (the padding sorts last)
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

    @cuda.jit
    def sample_kernel(out, logits, params, vocab):
        # out: [n] int32; logits: [n, V] (bits for 16-bit kinds); params: [NUM_FIELDS, n] int32
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        hcount = cuda.shared.array(NB, uint32)
        cand = cuda.shared.array(CAP, uint64)      # candidates; also the mass histogram
        scan = cuda.shared.array(NT, uint64)
        sv = cuda.shared.array(16, uint64)
        sf = cuda.shared.array(NT, float32)
        temp = bits_to_f32(params[TEMPERATURE, r])
        top_k = params[TOP_K, r]
        top_p = bits_to_f32(params[TOP_P, r])
        min_p = bits_to_f32(params[MIN_P, r])
        k0 = uint64(params[SEED_LO, r]) & MASK
        k1 = uint64(params[SEED_HI, r]) & MASK
        pos = uint64(params[POSITION, r]) & MASK
        greedy = temp == float32(0) or top_k == 1
        inv_t = float32(1) if greedy else float32(1) / temp
        need_k = top_k > 0 and top_k < vocab
        need_p = top_p < float32(1)
        need_m = min_p > float32(0)

        if greedy or not (need_k or need_p or need_m):
            # ---- one pass: argmax of z, plus Gumbel noise when sampling ----
            best = uint64(0)
            for base in range(tid * 4, vocab, NT * 4):
                w0, w1, w2, w3 = (uint64(0), uint64(0), uint64(0), uint64(0))
                if not greedy:
                    w0, w1, w2, w3 = philox(uint64(base >> 2), pos, uint64(0), uint64(0), k0, k1)
                for e in range(4):
                    i = base + e
                    if i < vocab:
                        v = load(logits[r, i]) * inv_t
                        if not greedy:
                            v += gumbel(w0 if e == 0 else (w1 if e == 1 else (w2 if e == 2 else w3)))
                        best = max(best, order_key(v, i))
            best = block_max_u64(best, sv, 8, tid)
            if tid == 0:
                out[r] = int32(MASK - (best & MASK))
            return

        # ---- pass A: the row's max z ----
        zmax = -INF
        for i in range(tid, vocab, NT):
            zmax = max(zmax, load(logits[r, i]) * inv_t)
        zmax = block_max_f(zmax, sf, tid)
        dmp = -math.log(min_p) if need_m else INF

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
                histogram(logits, r, vocab, inv_t, zmax, dmp, limit, prefix, pmask, shift, dmask, hcount, cand, tid)
                if use_mass and level == 0:
                    tm = uint64(0)
                    for j in range(C):
                        tm += cand[tid * C + j]
                    unused, total_m = block_excl_scan(tm, scan, tid)
                    target = max(uint64(1), uint64(math.ceil(float64(top_p) * float64(total_m))))
                b, cb, mb, nb, mbin = find_bin(hcount, cand, use_mass, target, bc, bm, scan, sv, tid)
                if b == uint64(NB):     # never reached: every considered token under limit stays
                    break
                if bc + cb + nb <= uint64(CAP_):   # few enough: finish in shared memory
                    hi_key = prefix | (b << shift) | ((uint64(1) << shift) - uint64(1))
                    n = gather(logits, r, vocab, inv_t, zmax, dmp, min(hi_key, limit), cand, sv, tid)
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
            tok = finish_in_shared(cand, n, top_k, open_k, top_p, need_p, total_m, pos, k0, k1, scan, sv, tid)
        else:
            # ---- the draw: argmax of (Gumbel - d) over the kept tokens ----
            best = uint64(0)
            for base in range(tid * 4, vocab, NT * 4):
                w0, w1, w2, w3 = philox(uint64(base >> 2), pos, uint64(0), uint64(0), k0, k1)
                for e in range(4):
                    i = base + e
                    if i < vocab:
                        d = zmax - load(logits[r, i]) * inv_t
                        if d <= dmp and uint64(f32_to_bits(d)) <= limit:
                            g = gumbel(w0 if e == 0 else (w1 if e == 1 else (w2 if e == 2 else w3)))
                            best = max(best, order_key(g - d, i))
            tok = block_max_u64(best, sv, 8, tid)
        if tid == 0:
            out[r] = int32(MASK - (tok & MASK))

    block_sum_f = make_block_reduce(NT, False)

    @_dev
    def select_count(logits, r, vocab, inv_t, zmax, num, hcount, cand, scan, sv, tid):
        """The ``num`` smallest keys (largest z), by the radix levels: (n, exact_key). n >= 0:
        cand[:n] holds, sorted, every token with key <= a bound that keeps at least num of them;
        n < 0: more than CAP tokens share the bound, whose exact key is returned."""
        prefix = uint64(0)
        pmask = uint64(0)
        bc = uint64(0)
        bm = uint64(0)
        for level in range(3):
            shift = uint64(21 - 11 * level) if level < 2 else uint64(0)
            dmask = uint64(0x7FF) if level < 2 else uint64(0x3FF)
            histogram(logits, r, vocab, inv_t, zmax, INF, MASK, prefix, pmask, shift, dmask, hcount, cand, tid)
            b, cb, mb, nb, mbin = find_bin(hcount, cand, False, uint64(num), bc, bm, scan, sv, tid)
            if bc + cb + nb <= uint64(CAP_):
                hi_key = prefix | (b << shift) | ((uint64(1) << shift) - uint64(1))
                return gather(logits, r, vocab, inv_t, zmax, INF, hi_key, cand, sv, tid), prefix
            prefix = prefix | (b << shift)
            pmask = pmask | (dmask << shift)
            bc += cb
            bm += mb
        return int64(-1), prefix

    @cuda.jit
    def logprobs_kernel(chosen, top_ids, top_lp, logits, params, tokens, vocab, num_top):
        # chosen: [n] f32; top_ids: [n, >= num_top] int32; top_lp: [n, >= num_top] f32
        # logits: [n, V] bits; params: [NUM_FIELDS, n] int32; tokens: [n] int32
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        hcount = cuda.shared.array(NB, uint32)
        cand = cuda.shared.array(CAP, uint64)
        scan = cuda.shared.array(NT, uint64)
        sv = cuda.shared.array(16, uint64)
        sf = cuda.shared.array(NT, float32)
        temp = bits_to_f32(params[TEMPERATURE, r])
        inv_t = float32(1) / temp if temp > float32(0) else float32(1)
        zmax = -INF
        for i in range(tid, vocab, NT):
            zmax = max(zmax, load(logits[r, i]) * inv_t)
        zmax = block_max_f(zmax, sf, tid)
        acc = float32(0)
        for i in range(tid, vocab, NT):
            acc += math.exp(load(logits[r, i]) * inv_t - zmax)
        log_sum = math.log(block_sum_f(acc, sf, tid))
        if tid == 0:
            chosen[r] = load(logits[r, tokens[r]]) * inv_t - zmax - log_sum
        if num_top == 0:
            return
        n, key = select_count(logits, r, vocab, inv_t, zmax, num_top, hcount, cand, scan, sv, tid)
        if n >= 0:
            for j in range(tid, min(n, int64(num_top)), NT):
                top_ids[r, j] = int32(cand[j] & MASK)
                top_lp[r, j] = -bits_to_f32(cand[j] >> SH32) - log_sum
            return
        # More than CAP tokens tie at the bound: the strictly smaller keys first (fewer than
        # num_top), then the tied tokens with the lowest ids, found in id order, tile by tile.
        below = int64(0)
        if key > uint64(0):
            below = gather(logits, r, vocab, inv_t, zmax, INF, key - uint64(1), cand, sv, tid)
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
            if i < vocab and uint64(f32_to_bits(zmax - load(logits[r, i]) * inv_t)) == key:
                hit = uint64(1)
            rank, count = block_excl_scan(hit, scan, tid)
            if hit and filled + int64(rank) < num_top:
                top_ids[r, filled + int64(rank)] = int32(i)
                top_lp[r, filled + int64(rank)] = tie_lp
            filled += int64(count)

    return sample_kernel, logprobs_kernel


def sample_cuda(logits, params, out, stream, threads: int = THREADS, cap: int = CAP):
    """Enqueue one draw per row (checked arguments: see ``pagemem.kernels.sample``); returns out."""
    kind = dtype_kind(logits.dtype, "logits")
    kernel = make_sample_kernel(kind, threads, cap)[0]
    launch(kernel, logits.shape[0], threads, stream, as_device(out), as_device(logits, bits_dtype(kind)),
           as_device(params), logits.shape[1])
    return out


def logprobs_cuda(logits, params, token_ids, num_top: int, chosen, top_ids, top_lp, stream,
                  threads: int = THREADS, cap: int = CAP):
    """Enqueue the log-probabilities of ``token_ids`` and the ``num_top`` largest per row."""
    kind = dtype_kind(logits.dtype, "logits")
    kernel = make_sample_kernel(kind, threads, cap)[1]
    launch(kernel, logits.shape[0], threads, stream, as_device(chosen), as_device(top_ids), as_device(top_lp),
           as_device(logits, bits_dtype(kind)), as_device(params), as_device(token_ids), logits.shape[1], num_top)
