"""NumPy references for token sampling: the specification of ``pagemem.kernels.sample`` and
``sample_logprobs``, and the CPU path of the engine.

Per row, with z = logits / temperature (float64 here):

    greedy        temperature 0 (or top_k 1): the argmax, lowest id on ties.
    top_k  k > 0  keep the tokens whose z is at least the k-th largest z (ties kept).
    min_p  m > 0  keep the tokens with p >= m * max p, i.e. z >= max z + log m.
    top_p  t < 1  over what top-k and min-p kept, renormalized: keep every token whose
                  probability is at least that of the token at which the mass, summed from the
                  most likely down, first reaches t (ties at that probability kept).
    draw          from softmax(z) restricted to the kept set.

top-k and min-p are both thresholds on z, so their order does not matter; top-p comes last
(vLLM's order: min-p, then top-k, then top-p). Randomness is counter-based: Philox4x32-10 keyed
by the row's 64-bit seed, with its counter holding the position of the token being drawn, so a
request's draws depend only on (seed, position), never on its batch (JAX's and cuRAND's design).
The GPU kernel draws by the Gumbel-max trick, argmax of (z + Gumbel noise) over the kept set,
with noise for token i from the counter (i // 4, position, 0, 0); this reference draws by
inverse CDF with one uniform per row from the counter (0, position, 1, 0), which is cheaper on
a CPU. Both are exact draws from the same distribution; they do not pick the same tokens.

Per-row settings travel as one int32 array ``params [NUM_FIELDS, num_rows]`` (``pack_params``):
floats as their bits, the seed as two 32-bit halves, so a step uploads one buffer.
"""
from __future__ import annotations

import numpy as np

FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed_lo", "seed_hi", "position")
NUM_FIELDS = len(FIELDS)
TEMPERATURE, TOP_K, TOP_P, MIN_P, SEED_LO, SEED_HI, POSITION = range(NUM_FIELDS)
MAX_LOGPROBS = 20

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)      # Philox4x32 multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)      # Weyl key increments
_MASK32 = np.uint64(0xFFFFFFFF)


def pack_params(temperature, top_k, top_p, min_p, seed, position) -> np.ndarray:
    """[NUM_FIELDS, n] int32 from per-row sequences (seed: ints in [0, 2**64))."""
    n = len(temperature)
    out = np.empty((NUM_FIELDS, n), dtype=np.int32)
    for row, vals in ((TEMPERATURE, temperature), (TOP_P, top_p), (MIN_P, min_p)):
        out[row] = np.asarray(vals, dtype=np.float32).view(np.int32)
    out[TOP_K] = np.asarray(top_k, dtype=np.int64)
    seeds = np.asarray([int(s) for s in seed], dtype=np.uint64)
    out[SEED_LO] = (seeds & _MASK32).astype(np.uint32).view(np.int32)
    out[SEED_HI] = (seeds >> np.uint64(32)).astype(np.uint32).view(np.int32)
    out[POSITION] = np.asarray(position, dtype=np.int64)
    return out


def unpack_params(params: np.ndarray) -> dict[str, np.ndarray]:
    """The fields of ``params`` [NUM_FIELDS, n] int32 as arrays (floats float32, seed uint64)."""
    p = np.asarray(params)
    seed = p[SEED_LO].view(np.uint32).astype(np.uint64) | (p[SEED_HI].view(np.uint32).astype(np.uint64) << np.uint64(32))
    return {"temperature": p[TEMPERATURE].view(np.float32), "top_k": p[TOP_K].astype(np.int64),
            "top_p": p[TOP_P].view(np.float32), "min_p": p[MIN_P].view(np.float32), "seed": seed,
            "position": p[POSITION].astype(np.int64)}


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC'11): counter [..., 4] and key [..., 2] as uint32 values
    held in uint64 arrays -> [..., 4] uint32 words (in uint64)."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[..., 0].astype(np.uint64), key[..., 1].astype(np.uint64)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = _M0 * c[0], _M1 * c[2]                    # 32 x 32 -> 64 bits: exact in uint64
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0), p1 & _MASK32, ((p0 >> np.uint64(32)) ^ c[3] ^ k1), p0 & _MASK32]
    return np.stack(c, axis=-1)


def uniform_from_bits(words: np.ndarray) -> np.ndarray:
    """uint32 words -> float32 in (0, 1): the top 23 bits plus one half, exactly representable."""
    return ((words >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)


def gumbel_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """[vocab] float32 Gumbel(0, 1) noise the GPU kernel adds to token i's z, from counter
    (i // 4, position, 0, 0), word i % 4 (for tests of the kernel's draws)."""
    blocks = np.arange(-(-vocab // 4), dtype=np.uint64)
    ctr = np.zeros((blocks.size, 4), dtype=np.uint64)
    ctr[:, 0], ctr[:, 1] = blocks, np.uint64(position) & _MASK32
    key = np.array([int(seed) & 0xFFFFFFFF, int(seed) >> 32], dtype=np.uint64)
    u = uniform_from_bits(philox4x32(ctr, key).reshape(-1)[:vocab])
    return (-np.log(-np.log(u.astype(np.float64)))).astype(np.float32)


def row_uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[n] float32: each row's uniform for the inverse-CDF draw, from counter (0, position, 1, 0)."""
    seeds, n = np.asarray(seeds, dtype=np.uint64), len(seeds)
    key = np.stack([seeds & _MASK32, seeds >> np.uint64(32)], axis=-1)
    ctr = np.zeros((n, 4), dtype=np.uint64)
    ctr[:, 1], ctr[:, 2] = np.asarray(positions, dtype=np.int64).astype(np.uint64) & _MASK32, 1
    return uniform_from_bits(philox4x32(ctr, key)[:, 0])


def ref_kept_mask(z: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """[V] bool: the tokens a row may draw, for temperature-scaled logits z [V] (float64)."""
    keep = np.ones(z.shape[0], dtype=bool)
    if 0 < top_k < z.shape[0]:
        keep &= z >= np.partition(z, -top_k)[-top_k]
    if min_p > 0:
        keep &= z >= z.max() + np.log(min_p)
    if top_p < 1:
        w = np.where(keep, np.exp(z - z.max()), 0.0)
        order = np.argsort(-w, kind="stable")
        cum = np.cumsum(w[order])
        j = int(np.searchsorted(cum, top_p * cum[-1], side="left"))   # first index with cum >= top_p * total
        keep &= w >= w[order[min(j, w.size - 1)]]
    return keep


def ref_sampling_probs(logits: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[n, V] float64: each row's target distribution (one-hot for greedy rows)."""
    x = np.asarray(logits, dtype=np.float64)
    f = unpack_params(params)
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        t, k = float(f["temperature"][r]), int(f["top_k"][r])
        if t == 0 or k == 1:
            out[r, int(np.argmax(x[r]))] = 1.0
            continue
        z = x[r] / t
        keep = ref_kept_mask(z, k, float(f["top_p"][r]), float(f["min_p"][r]))
        w = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        out[r] = w / w.sum()
    return out


def ref_sample(logits: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[n] int32 token ids: greedy rows take the argmax; the others draw by inverse CDF from
    their ``ref_sampling_probs`` row with the row's counter-based uniform."""
    x = np.asarray(logits)
    f = unpack_params(params)
    out = np.asarray(x.argmax(axis=1), dtype=np.int32)            # greedy rows: done
    rows = np.flatnonzero((f["temperature"] != 0) & (f["top_k"] != 1))
    if rows.size:
        u = row_uniforms(f["seed"][rows], f["position"][rows])
        probs = ref_sampling_probs(x[rows], np.asarray(params)[:, rows])
        cum = np.cumsum(probs, axis=1)                             # [len(rows), V]
        idx = (cum <= (u.astype(np.float64) * cum[:, -1])[:, None]).sum(axis=1)   # first cum > u * total
        idx = np.minimum(idx, x.shape[1] - 1)
        last_kept = x.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
        bad = probs[np.arange(rows.size), idx] == 0                # only at u * total == total
        out[rows] = np.where(bad, last_kept, idx)
    return out


def ref_logprobs(logits: np.ndarray, params: np.ndarray, token_ids: np.ndarray, num_top: int):
    """(chosen [n] float32, top_ids [n, num_top] int32, top_logprobs [n, num_top] float32):
    log-probabilities after temperature and before top-k/top-p/min-p (temperature 1 for greedy
    rows), the chosen token's and the ``num_top`` largest (ties by lowest id)."""
    x = np.asarray(logits, dtype=np.float64)
    t = unpack_params(params)["temperature"].astype(np.float64)
    z = x / np.where(t > 0, t, 1.0)[:, None]
    lp = z - z.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    rows = np.arange(x.shape[0])
    chosen = lp[rows, np.asarray(token_ids, dtype=np.int64)].astype(np.float32)
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[1]), x.shape), -lp), axis=1)[:, :num_top]
    return chosen, order.astype(np.int32), np.take_along_axis(lp, order, axis=1).astype(np.float32)
