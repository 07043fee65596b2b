"""CPU path: vectorized NumPy over the paged cache, float32 math (BLAS matmuls).

This is what CPU generation runs, so it gathers each step's pages once, never loops per head,
and chunks long prompts so score blocks stay bounded. Page ids are checked (ValueError), since
NumPy would silently wrap a negative id to the last page, and so are the lengths the docs require
(``check_host_lens``): a context_len of 0 would give NaN rows, one longer than its page table a
raw IndexError, a query_start_loc short of num_tokens unwritten output rows.
"""
from __future__ import annotations

import numpy as np

from pagemem.kernels._checks import AttnDims, check_host_lens

NULL_PAGE = 0
PREFILL_CHUNK = 256   # query tokens per score block in prefill


def _check_pages(page_ids: np.ndarray, num_pages: int, name: str = "page_tables") -> None:
    bad = (page_ids <= NULL_PAGE) | (page_ids >= num_pages)
    if bad.any():
        raise ValueError(f"{name}: page ids {np.unique(page_ids[bad])[:8].tolist()} are not in "
                         f"1..{num_pages - 1} (NULL_PAGE or out of the pool)")


def store_kv_cpu(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k_cache[slot // P, slot % P] = k[i] for each new token i (in place)."""
    pages, offs = np.divmod(slot_mapping.astype(np.int64), k_cache.shape[1])
    _check_pages(pages, k_cache.shape[0], "slot_mapping")
    k_cache[pages, offs] = k
    v_cache[pages, offs] = v


def _softmax_(s: np.ndarray) -> np.ndarray:
    """In-place softmax over the last axis; rows are never fully masked."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def paged_decode_cpu(q, k_cache, v_cache, page_tables, context_lens, scale: float, out, window: int,
                     dims: AttnDims):
    """One query per sequence. All sequences' pages are gathered at once (token-major, one copy),
    then per KV head two batched BLAS products read K and V rows in place (row stride Hkv * D)."""
    S, P, Hkv, G, D = dims.num_seqs, dims.page_size, dims.num_kv_heads, dims.group, dims.head_dim
    check_host_lens(page_tables.shape, P, context_lens)
    if S == 0:
        return out
    ctx = context_lens.astype(np.int64)                          # [S]
    num_pages = -(-int(ctx.max()) // P)
    T = num_pages * P
    t = np.arange(T)
    lo = np.maximum(ctx - window, 0) if window else np.zeros_like(ctx)
    valid = (t[None, :] < ctx[:, None]) & (t[None, :] >= lo[:, None])   # [S, T]
    used = valid.reshape(S, num_pages, P).any(axis=2)                   # [S, num_pages]
    pages = page_tables[:, :num_pages]
    _check_pages(pages[used], k_cache.shape[0])
    pages = np.where(used, pages, NULL_PAGE)                    # unused pages read NULL_PAGE, masked
    k = k_cache[pages].reshape(S, T, Hkv, D).astype(np.float32, copy=False)   # [S, T, Hkv, D]
    v = v_cache[pages].reshape(S, T, Hkv, D).astype(np.float32, copy=False)
    v[~valid] = 0.0                                             # masked tokens: no 0 * NaN in p @ v
    qt = (q.astype(np.float32) * np.float32(scale)).reshape(S, Hkv, G, D).transpose(0, 1, 3, 2)
    qt = np.ascontiguousarray(qt)                               # [S, Hkv, D, G]: BLAS-ready
    s = np.empty((S, Hkv, G, T), np.float32)
    for h in range(Hkv):                                        # [S, T, D] @ [S, D, G] -> [S, T, G]
        s[:, h] = np.matmul(k[:, :, h], qt[:, h]).transpose(0, 2, 1)
    np.copyto(s, -np.inf, where=~valid[:, None, None, :])
    p = _softmax_(s)
    o = np.empty((S, Hkv, G, D), np.float32)
    for h in range(Hkv):                                        # [S, G, T] @ [S, T, D]
        o[:, h] = np.matmul(p[:, h], v[:, :, h])
    out[...] = o.reshape(S, Hkv * G, D)
    return out


def paged_prefill_cpu(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale: float,
                      out, window: int, dims: AttnDims):
    """Ragged causal attention, one sequence at a time, PREFILL_CHUNK queries per score block."""
    check_host_lens(page_tables.shape, dims.page_size, context_lens, query_start_loc, q.shape[0])
    qsl = query_start_loc.astype(np.int64)
    for s, ctx in enumerate(context_lens.astype(np.int64).tolist()):
        lo, hi = int(qsl[s]), int(qsl[s + 1])
        _prefill_one(q, k_cache, v_cache, page_tables[s], ctx, lo, hi, scale, out, window, dims)
    return out


def _prefill_one(q, k_cache, v_cache, page_table, ctx, lo, hi, scale, out, window, dims: AttnDims):
    P, Hkv, G, D = dims.page_size, dims.num_kv_heads, dims.group, dims.head_dim
    pages = page_table[: -(-ctx // P)].astype(np.int64)
    _check_pages(pages, k_cache.shape[0])
    k = k_cache[pages].reshape(-1, Hkv, D)[:ctx].astype(np.float32)    # [ctx, Hkv, D]
    v = v_cache[pages].reshape(-1, Hkv, D)[:ctx].astype(np.float32)
    kt, vt = k.transpose(1, 2, 0), v.transpose(1, 0, 2)                 # [Hkv, D, ctx], [Hkv, ctx, D]
    for a in range(lo, hi, PREFILL_CHUNK):
        b = min(hi, a + PREFILL_CHUNK)
        pos = np.arange(a, b) - hi + ctx                                 # [m] positions
        k_lo = max(0, int(pos[0]) - window + 1) if window else 0
        k_hi = int(pos[-1]) + 1
        j = np.arange(k_lo, k_hi)
        mask = j[None, :] <= pos[:, None]                                # [m, keys]
        if window:
            mask &= pos[:, None] - j[None, :] < window
        qq = q[a:b].astype(np.float32).reshape(b - a, Hkv, G, D).transpose(1, 0, 2, 3)
        qq = qq.reshape(Hkv, (b - a) * G, D) * np.float32(scale)        # rows: query * G + g
        s = np.matmul(qq, kt[:, :, k_lo:k_hi])                          # [Hkv, m * G, keys]
        s[:, ~np.repeat(mask, G, axis=0)] = -np.inf
        o = np.matmul(_softmax_(s), vt[:, k_lo:k_hi])                   # [Hkv, m * G, D]
        out[a:b] = o.reshape(Hkv, b - a, G, D).transpose(1, 0, 2, 3).reshape(b - a, Hkv * G, D)


# ---- per-token ops of a layer: the same rounding points as kernels/pointwise.py --------------------
def rms_norm_cpu(x, weight, eps: float, residual, out):
    if residual is not None:
        residual += x          # the residual stream, in place, in its dtype
        x = residual
    xf = x.astype(np.float32, copy=False)
    out[...] = weight * (xf / np.sqrt((xf * xf).mean(axis=-1, keepdims=True) + np.float32(eps))).astype(x.dtype)
    return out


def rope_cpu(x, positions, inv_freq) -> None:
    """In place; cos and sin rounded to x's dtype, the math in that dtype (as HF)."""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]   # [T, d // 2]
    cos, sin = (f(angles)[:, None, :].astype(x.dtype) for f in (np.cos, np.sin))
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].copy(), x[..., half:].copy()
    x[..., :half] = x1 * cos - x2 * sin
    x[..., half:] = x2 * cos + x1 * sin


def silu_mul_cpu(gate_up, out):
    inter = out.shape[1]
    g = gate_up[:, :inter].astype(np.float32)
    out[...] = (g / (1 + np.exp(-g))).astype(out.dtype) * gate_up[:, inter:]
    return out
