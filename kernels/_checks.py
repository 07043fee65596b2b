"""Argument checks shared by every launcher (CPU and CUDA): TypeError for a wrong type or dtype,
ValueError for a wrong shape, stride or value, each naming the argument."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pagemem.kernels._arrays import is_device_array
from pagemem.kernels._device import dtype_kind


class AttnDims(NamedTuple):
    num_seqs: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    group: int            # query heads per KV head
    cache_kind: int
    q_kind: int


def check_same_device(**arrays) -> bool:
    """True when every array is a device (CuPy) array, False when all are NumPy."""
    kinds = {}
    for name, x in arrays.items():
        if isinstance(x, np.ndarray):
            kinds[name] = False
        elif is_device_array(x):
            kinds[name] = True
        else:
            raise TypeError(f"{name}: expected a numpy or cupy array, got {type(x).__name__}")
    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays must all be numpy or all cupy, got {kinds} (True = cupy)")
    return next(iter(kinds.values()))


def check_int_array(x, name: str, ndim: int, shape0: int | None = None) -> None:
    if np.dtype(x.dtype) != np.int32:
        raise TypeError(f"{name}: dtype must be int32, got {np.dtype(x.dtype)}")
    if x.ndim != ndim or (shape0 is not None and x.shape[0] != shape0):
        raise ValueError(f"{name}: expected {ndim}-d with {shape0} rows, got shape {tuple(x.shape)}")


def check_cache(k_cache, v_cache) -> int:
    """k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], same dtype and strides;
    the last axis contiguous and every stride a multiple of 8 bytes (kernels read uint64 words)."""
    kind = dtype_kind(k_cache.dtype, "k_cache")
    if np.dtype(v_cache.dtype) != np.dtype(k_cache.dtype):
        raise TypeError(f"v_cache: dtype {np.dtype(v_cache.dtype)} differs from k_cache's {np.dtype(k_cache.dtype)}")
    if k_cache.ndim != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"k_cache, v_cache: expected equal 4-d shapes [num_pages, page_size, num_kv_heads, "
                         f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    page_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"k_cache: page_size must be a power of two, got {page_size}")
    itemsize = np.dtype(k_cache.dtype).itemsize
    if head_dim % 8 or head_dim > 256:
        raise ValueError(f"k_cache: head_dim must be a multiple of 8 and at most 256, got {head_dim}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.strides[3] != itemsize or any(st % 8 for st in c.strides[:3]):
            raise ValueError(f"{name}: last axis must be contiguous and other strides multiples of 8 bytes, "
                             f"got strides {tuple(c.strides)}")
    if tuple(v_cache.strides) != tuple(k_cache.strides):
        raise ValueError(f"v_cache: strides {tuple(v_cache.strides)} differ from k_cache's {tuple(k_cache.strides)}")
    return kind


def check_attention(q, k_cache, v_cache, page_tables, context_lens, out, num_seqs: int) -> AttnDims:
    """Shared checks of paged_decode / paged_prefill; q: [num_tokens, num_q_heads, head_dim]."""
    cache_kind = check_cache(k_cache, v_cache)
    q_kind = dtype_kind(q.dtype, "q")
    _, _, num_kv_heads, head_dim = k_cache.shape
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q: expected [num_tokens, num_q_heads, {head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q: num_q_heads={q.shape[1]} is not a multiple of num_kv_heads={num_kv_heads}")
    check_int_array(page_tables, "page_tables", 2, num_seqs)
    check_int_array(context_lens, "context_lens", 1, num_seqs)
    if out is not None:
        dtype_kind(out.dtype, "out")
        if tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"out: shape {tuple(out.shape)} differs from q's {tuple(q.shape)}")
    return AttnDims(num_seqs, q.shape[1], num_kv_heads, head_dim, k_cache.shape[1],
                    q.shape[1] // num_kv_heads, cache_kind, q_kind)


def check_host_lens(page_tables_shape: tuple[int, int], page_size: int, context_lens: np.ndarray,
                    query_start_loc: np.ndarray | None = None, num_tokens: int | None = None) -> None:
    """The per-sequence lengths a kernel's docs require, checked on host (NumPy) values: every
    ``context_lens[s]`` (>= 1) fits the ``page_tables_shape = (num_seqs, max_pages)`` table,
    and for prefill ``query_start_loc`` ([num_seqs + 1]) starts at 0, ends at ``num_tokens`` and
    gives each sequence 1..context_len new tokens. ValueError naming the argument and the first
    bad sequence; O(num_seqs) vectorized. A GPU launcher (or its plan) calls it on the host copies
    a batch carries (``PagedBatch.host_context_lens``), never on device arrays."""
    ctx = np.asarray(context_lens).astype(np.int64, copy=False)         # [num_seqs]
    max_tokens = int(page_tables_shape[1]) * int(page_size)
    bad = np.flatnonzero((ctx < 1) | (ctx > max_tokens))
    if bad.size:
        s = int(bad[0])
        raise ValueError(f"context_lens: seq {s} has context_len {int(ctx[s])}; each must be in "
                         f"1..{max_tokens} ({page_tables_shape[1]} pages of {page_size} in page_tables)")
    if query_start_loc is None:
        return
    qsl = np.asarray(query_start_loc).astype(np.int64, copy=False)     # [num_seqs + 1]
    if qsl[0] != 0 or (num_tokens is not None and qsl[-1] != num_tokens):
        raise ValueError(f"query_start_loc: must run from 0 to num_tokens={num_tokens} (every query "
                         f"row written once), got {int(qsl[0])} .. {int(qsl[-1])}")
    q = np.diff(qsl)                                                     # [num_seqs] new tokens
    bad = np.flatnonzero((q < 1) | (q > ctx))
    if bad.size:
        s = int(bad[0])
        raise ValueError(f"query_start_loc: seq {s} has {int(q[s])} new tokens but context_len {int(ctx[s])}")


def check_window(sliding_window) -> int:
    """0 for no window, else the window (>= 1)."""
    if sliding_window is None:
        return 0
    if int(sliding_window) != sliding_window or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    return int(sliding_window)


def default_scale(scale, head_dim: int) -> float:
    return float(1.0 / np.sqrt(head_dim)) if scale is None else float(scale)
