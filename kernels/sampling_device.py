"""Device functions of the sampling kernels: Philox4x32-10, Gumbel noise, order keys, fixed-point
masses, coalesced loads of four logits at a time, and block-wide max / scan / k-th largest.

Loads come in *quads*: token ids 4q .. 4q+3. A quad is one uint64 word of four fp16/bf16
values, two words of fp32 values, or (rows not 8-byte aligned) four scalar loads; consecutive
threads read consecutive quads, and one Philox call gives the quad's four noise words.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, uint64

from pagemem.kernels._device import F32, f32_to_bits, load_scalar, unpack

M0, M1, W0, W1 = uint64(0xD2511F53), uint64(0xCD9E8D57), uint64(0x9E3779B9), uint64(0xBB67AE85)
MASK = uint64(0xFFFFFFFF)
SH32 = uint64(32)
INF = float32(math.inf)
# How a kernel reads a row: four scalars, one word of four 16-bit values, two words of fp32.
SCALARS, WORD16, WORD32 = 0, 1, 2


def _dev(fn):
    # a device function under the simulator too, so that it sees the simulator's cuda module
    return cuda.jit(device=True)(fn)


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
    """Gumbel(0, 1) noise from one 32-bit word: u = (top 23 bits + 1/2) * 2^-23 in (0, 1)."""
    u = (float32(word >> uint64(9)) + float32(0.5)) * float32(2.0 ** -23)
    return -math.log(-math.log(u))


@_dev
def pick(a, b, c, d, e):
    return a if e == 0 else (b if e == 1 else (c if e == 2 else d))


@_dev
def word_of(i, pos, k0, k1):
    """Token i's random word: word i % 4 of Philox at counter (i // 4, position, 0, 0)."""
    w0, w1, w2, w3 = philox(uint64(i) >> uint64(2), pos, uint64(0), uint64(0), k0, k1)
    return pick(w0, w1, w2, w3, i & 3)


@_dev
def order_key(v, i):
    """uint64 whose order is v's (float32), then the lower token id: an argmax by max()."""
    b = uint64(f32_to_bits(v))
    if b & uint64(0x80000000):
        b = (~b) & MASK
    else:
        b = b | uint64(0x80000000)
    return (b << SH32) | (MASK - uint64(i))


@_dev
def token_of(key):
    return int32(MASK - (key & MASK))


@_dev
def mass_of(d):
    """Fixed-point probability mass relative to the top token: exp(-d) * 2^32, truncated."""
    return uint64(math.exp(-d) * float32(4294967296.0))


@_dev
def dist(x, inv_t, zmax):
    """d = max z - z >= 0. Clamped: the compiler may fuse zmax - x * inv_t into one FMA, which
    leaves the top token a rounding error below zero, and keys are the bits of a d >= 0."""
    return max(float32(0), zmax - x * inv_t)


@functools.cache
def make_quad_load(kind: int, mode: int):
    """quad(words, bits, r, q, vocab) -> four float32 logits of row r, ids 4q .. 4q+3 (-inf past
    the vocabulary). ``words``: the row as uint64 words (modes WORD16, WORD32); ``bits``: the
    row as scalars (every mode, for the last, partial quad)."""
    load = load_scalar[kind]
    get = unpack[kind]
    neg = -INF

    @_dev
    def quad(words, bits, r, q, vocab):
        i = 4 * q
        if i + 3 < vocab:
            if mode == WORD16:
                w = words[r, q]
                return get(w, 0), get(w, 1), get(w, 2), get(w, 3)
            if mode == WORD32:
                w0 = words[r, 2 * q]
                w1 = words[r, 2 * q + 1]
                return get(w0, 0), get(w0, 1), get(w1, 0), get(w1, 1)
            return load(bits[r, i]), load(bits[r, i + 1]), load(bits[r, i + 2]), load(bits[r, i + 3])
        x0 = load(bits[r, i]) if i < vocab else neg
        x1 = load(bits[r, i + 1]) if i + 1 < vocab else neg
        x2 = load(bits[r, i + 2]) if i + 2 < vocab else neg
        return x0, x1, x2, neg
    return quad


TILE_WORDS = 8          # uint64 words a thread loads before it uses the first (loads in flight)


def _generated(name: str, src: str, env: dict):
    """A device function from source built for fixed sizes: the tile's loads and calls are
    written out one by one, so that its values stay in registers (a loop over a local array
    the compiler does not unroll keeps them in local memory, and reuses one register for every
    other load, which leaves two loads in flight)."""
    ns = dict(env)
    exec(compile(src, f"<pagemem.kernels.sampling_device:{name}>", "exec"), ns)
    return _dev(ns[name])


@functools.cache
def make_row_scan(kind: int, mode: int, body, tile_words: int = TILE_WORDS):
    """scan(words, bits, r, vocab, off, stride, state, ctx) -> state: ``body(x0, x1, x2, x3, q,
    state, ctx) -> state`` over the quads off, off + stride, ... of row r (four float32 logits,
    ids 4q .. 4q+3; past the vocabulary -inf, so a body checks 4q + e < vocab).

    The row is read in tiles of several quads a thread, all loaded before the first is used, so
    that a thread keeps ``tile_words`` loads in flight instead of one: a loop that loads one quad
    and uses it waits out the memory latency once per quad, which held a block of the sampling
    kernels to a small share of the bandwidth. Loads past the last whole quad repeat it (every
    load is unconditional) and are skipped; the partial quad at the end goes through ``quad``."""
    quad = make_quad_load(kind, mode)
    get = unpack[kind]
    if mode == SCALARS:
        @_dev
        def scan_scalars(words, bits, r, vocab, off, stride, state, ctx):
            for q in range(off, (vocab + 3) // 4, stride):
                x0, x1, x2, x3 = quad(words, bits, r, q, vocab)
                state = body(x0, x1, x2, x3, q, state, ctx)
            return state
        return scan_scalars
    per = 2 if mode == WORD32 else 1
    U = max(1, tile_words // per)
    lines = ["def tile(words, r, q0, stride, nfull, state, ctx):", "    last = nfull - 1"]
    for u in range(U):
        lines.append(f"    c{u} = min(q0 + {u} * stride, last)")
    for u in range(U):                      # every load first
        if per == 1:
            lines.append(f"    w{u} = words[r, c{u}]")
        else:
            lines.append(f"    w{u}a = words[r, 2 * c{u}]")
            lines.append(f"    w{u}b = words[r, 2 * c{u} + 1]")
    for u in range(U):
        xs = (f"get(w{u}, 0), get(w{u}, 1), get(w{u}, 2), get(w{u}, 3)" if per == 1 else
              f"get(w{u}a, 0), get(w{u}a, 1), get(w{u}b, 0), get(w{u}b, 1)")
        lines.append(f"    if q0 + {u} * stride < nfull:")
        lines.append(f"        state = body({xs}, q0 + {u} * stride, state, ctx)")
    lines.append("    return state")
    tile = _generated("tile", "\n".join(lines) + "\n", {"body": body, "get": get, "min": min})

    @_dev
    def scan(words, bits, r, vocab, off, stride, state, ctx):
        nfull = vocab // 4
        for q0 in range(off, nfull, stride * U):
            state = tile(words, r, q0, stride, nfull, state, ctx)
        for q in range(nfull + off, (vocab + 3) // 4, stride):     # the last, partial quad
            x0, x1, x2, x3 = quad(words, bits, r, q, vocab)
            state = body(x0, x1, x2, x3, q, state, ctx)
        return state
    return scan


def quad_mode(kind: int, aligned: bool) -> int:
    if not aligned:
        return SCALARS
    return WORD32 if kind == F32 else WORD16


@functools.cache
def make_block_ops(threads: int):
    """(block_max_u64, block_excl_scan, kth_largest) for blocks of ``threads`` threads; each has
    barriers, so call them in block-uniform control flow."""
    NT = threads

    @_dev
    def block_max_u64(v, sv, slot, tid):
        """Max of v over the block through one shared slot (atomics: any thread order)."""
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
    def kth_largest(v, k, sf, sfk, tid):
        """The k-th largest (1 <= k <= NT) of one float32 per thread: each thread ranks its own
        value (ties by thread id) and the one of rank k - 1 publishes it."""
        sf[tid] = v
        cuda.syncthreads()  # all values in
        rank = 0
        for j in range(NT):
            o = sf[j]
            if o > v or (o == v and j < tid):
                rank += 1
        if rank == k - 1:
            sfk[0] = v
        cuda.syncthreads()  # published
        out = sfk[0]
        cuda.syncthreads()  # read before reuse
        return out

    return block_max_u64, block_excl_scan, kth_largest
