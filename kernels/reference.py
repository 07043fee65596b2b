"""NumPy references: the specification of every kernel. Slow, simple, float64 math.

Shapes:
    k_cache, v_cache  [num_pages, page_size, num_kv_heads, head_dim]  (may be strided over pages)
    page_tables       [num_seqs, max_pages] int32, padded with NULL_PAGE (0)
    context_lens      [num_seqs] int32 >= 1: cached tokens, the new ones included
    query_start_loc   [num_seqs + 1] int32: new tokens of seq i are q[qsl[i]:qsl[i+1]]

New tokens are the *last* tokens of their sequence's context and their K/V are already
in the cache (store_kv runs first). Token at position p attends to positions j <= p,
and with ``sliding_window=W`` only to those with p - j < W (Mistral / HF semantics).
"""
from __future__ import annotations

import numpy as np

NULL_PAGE = 0


def _pages_of(page_tables: np.ndarray, s: int, context_len: int, page_size: int, num_pages: int) -> np.ndarray:
    """Page ids holding seq s's first context_len tokens; asserts each is a real page.
    (NumPy silently wraps kv[-1] to the last page: the assert is what catches bad padding.)"""
    n = -(-context_len // page_size)
    assert n <= page_tables.shape[1], f"seq {s}: {context_len} tokens need {n} pages, table has {page_tables.shape[1]}"
    pages = np.asarray(page_tables[s, :n], dtype=np.int64)
    bad = (pages <= NULL_PAGE) | (pages >= num_pages)
    assert not bad.any(), f"seq {s}: invalid page ids {pages[bad].tolist()} in its first {n} entries"
    return pages


def _gather(cache: np.ndarray, pages: np.ndarray, context_len: int) -> np.ndarray:
    """[context_len, num_kv_heads, head_dim] float64 tokens of one sequence."""
    return cache[pages].reshape(-1, *cache.shape[2:])[:context_len].astype(np.float64)


def ref_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k_cache[slot // page_size, slot % page_size] = k[i] for each new token i (in place).
    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int32."""
    page_size = k_cache.shape[1]
    for i, s in enumerate(np.asarray(slot_mapping).tolist()):
        page, off = divmod(s, page_size)
        assert NULL_PAGE < page < k_cache.shape[0], f"token {i}: slot {s} is in page {page}"
        k_cache[page, off] = k[i]
        v_cache[page, off] = v[i]


def _attend(q, k, v, positions, scale, sliding_window):
    """q: [n, num_q_heads, d] at ``positions``; k, v: [ctx, num_kv_heads, d] -> [n, num_q_heads, d]."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.astype(np.float64).reshape(n, hkv, group, d).transpose(1, 0, 2, 3).reshape(hkv, n * group, d)
    kh = k.astype(np.float64).transpose(1, 2, 0)                    # [hkv, d, ctx]
    s = np.matmul(qg, kh).reshape(hkv, n, group, -1).transpose(1, 0, 2, 3) * scale   # [n, hkv, group, ctx]
    j = np.arange(k.shape[0])
    mask = j[None, :] <= positions[:, None]                         # [n, ctx] causal
    if sliding_window is not None:
        mask &= positions[:, None] - j[None, :] < sliding_window
    s = np.where(mask[:, None, None, :], s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    ph = p.transpose(1, 0, 2, 3).reshape(hkv, n * group, -1)        # [hkv, n * group, ctx]
    o = np.matmul(ph, v.astype(np.float64).transpose(1, 0, 2))       # [hkv, n * group, d]
    return o.reshape(hkv, n, group, d).transpose(1, 0, 2, 3).reshape(n, hq, d)


def ref_paged_decode(q, k_cache, v_cache, page_tables, context_lens, scale=None, sliding_window=None):
    """One query token per sequence at position context_len - 1.
    q: [num_seqs, num_q_heads, head_dim] -> [num_seqs, num_q_heads, head_dim] float32."""
    num_seqs = q.shape[0]
    qsl = np.arange(num_seqs + 1, dtype=np.int32)
    return ref_paged_prefill(q, k_cache, v_cache, page_tables, context_lens, qsl, scale, sliding_window)


def ref_paged_prefill(q, k_cache, v_cache, page_tables, context_lens, query_start_loc,
                      scale=None, sliding_window=None):
    """Ragged new tokens attending causally to their sequence's cache.
    q: [num_tokens, num_q_heads, head_dim] -> [num_tokens, num_q_heads, head_dim] float32."""
    q = np.asarray(q)
    num_pages, page_size = k_cache.shape[:2]
    assert q.shape[1] % k_cache.shape[2] == 0, "num_q_heads must be a multiple of num_kv_heads"
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    qsl = np.asarray(query_start_loc).tolist()
    out = np.zeros(q.shape, dtype=np.float32)
    for s, ctx in enumerate(np.asarray(context_lens).tolist()):
        lo, hi = qsl[s], qsl[s + 1]
        assert 1 <= hi - lo <= ctx, f"seq {s}: {hi - lo} new tokens but context_len {ctx}"
        pages = _pages_of(np.asarray(page_tables), s, ctx, page_size, num_pages)
        k, v = _gather(k_cache, pages, ctx), _gather(v_cache, pages, ctx)
        positions = np.arange(ctx - (hi - lo), ctx)
        out[lo:hi] = _attend(q[lo:hi], k, v, positions, scale, sliding_window)
    return out


# ---- per-token ops of a layer (kernels/pointwise.py) --------------------------------------------
def ref_rms_norm(x, weight, eps, residual=None):
    """(out float64 [T, H], residual after the add or None): r = x, or residual + x stored in
    x's dtype; out = r / sqrt(mean(r^2) + eps) * weight."""
    r = x if residual is None else (residual.astype(np.float64) + x.astype(np.float64)).astype(x.dtype)
    rf = r.astype(np.float64)
    out = rf / np.sqrt((rf * rf).mean(axis=-1, keepdims=True) + eps) * weight.astype(np.float64)
    return out, None if residual is None else r


def ref_rope(x, positions, inv_freq):
    """Rotate-half RoPE (pairs i, i + d/2): x [T, heads, d] -> [T, heads, d] float64. The angles
    are position * inv_freq in float32, as HF computes them (at position 4096 float32 already
    moves an angle by 2e-4), the rest in float64."""
    ang = (np.asarray(positions, dtype=np.float32)[:, None] * np.asarray(inv_freq, dtype=np.float32)[None, :])
    ang = ang.astype(np.float64)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    xf = x.astype(np.float64)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def ref_silu_mul(gate_up):
    """SwiGLU, float64: gate_up [T, 2 * I] -> silu(gate) * up [T, I]."""
    g, u = np.split(gate_up.astype(np.float64), 2, axis=-1)
    return g / (1 + np.exp(-g)) * u
