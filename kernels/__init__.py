"""kernels: paged-attention kernels as pure functions over arrays and a stream.

NumPy arrays run the vectorized CPU path (kernels/cpu.py); CuPy arrays run Numba CUDA kernels
enqueued on ``stream`` (a CuPy stream; default CuPy's current stream) without synchronizing.
``kernels.reference`` holds the NumPy oracles that specify every kernel.

    store_kv        k, v [num_tokens, num_kv_heads, head_dim] -> their slots of the cache
    paged_decode    q [num_seqs, num_q_heads, head_dim], one new token per sequence
    paged_prefill   q [num_tokens, num_q_heads, head_dim], ragged new tokens (query_start_loc)

Caches are the per-layer views ``[num_pages, page_size, num_kv_heads, head_dim]`` (fp16, bf16 or
fp32; strided over pages is fine), page_tables ``[num_seqs, max_pages]`` int32 padded with
NULL_PAGE (0), context_lens ``[num_seqs]`` int32 >= 1 counting the new tokens. Math is float32.
"""
from __future__ import annotations

from kernels import cpu as _cpu
from kernels._checks import check_attention, check_int_array, check_same_device, check_window, default_scale

__all__ = ["store_kv", "paged_decode", "paged_prefill"]


def store_kv(k, v, k_cache, v_cache, slot_mapping, stream=None) -> None:
    """Write new K/V into slots (``page_id * page_size + offset``). On the GPU, slots outside the
    pool or in NULL_PAGE are skipped; on the CPU they raise ValueError."""
    from kernels.store_kv_kernel import check_store_kv
    on_gpu = check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    if not on_gpu:
        return _cpu.store_kv_cpu(k, v, k_cache, v_cache, slot_mapping)
    from kernels.store_kv_kernel import store_kv_cuda
    store_kv_cuda(k, v, k_cache, v_cache, slot_mapping, stream)


def paged_decode(q, k_cache, v_cache, page_tables, context_lens, scale=None, out=None, stream=None,
                 sliding_window=None):
    """Attention of each sequence's one new query token over its cached tokens (the last of which
    is its own). Returns ``out`` [num_seqs, num_q_heads, head_dim] (default: q's dtype)."""
    on_gpu = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_tables=page_tables,
                               context_lens=context_lens, **({} if out is None else {"out": out}))
    dims = check_attention(q, k_cache, v_cache, page_tables, context_lens, out, q.shape[0] if q.ndim else 0)
    scale, window = default_scale(scale, dims.head_dim), check_window(sliding_window)
    out = _empty_like(q) if out is None else out
    if not on_gpu:
        return _cpu.paged_decode_cpu(q, k_cache, v_cache, page_tables, context_lens, scale, out, window, dims)
    from kernels.decode import paged_decode_cuda
    return paged_decode_cuda(q, k_cache, v_cache, page_tables, context_lens, scale, out, stream, window, dims)


def paged_prefill(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale=None, out=None,
                  stream=None, sliding_window=None, max_query_len=None):
    """Ragged causal attention: the new tokens q[qsl[i]:qsl[i+1]] of sequence i are its last ones
    (already stored) and attend to its cached prefix and to each other causally. On the GPU,
    ``max_query_len`` (host int) sizes the padded blocks; without it the bound
    ``num_tokens - num_seqs + 1`` is used, which wastes work on ragged batches."""
    on_gpu = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_tables=page_tables,
                               context_lens=context_lens, query_start_loc=query_start_loc,
                               **({} if out is None else {"out": out}))
    num_seqs = context_lens.shape[0] if context_lens.ndim == 1 else -1
    dims = check_attention(q, k_cache, v_cache, page_tables, context_lens, out, num_seqs)
    check_int_array(query_start_loc, "query_start_loc", 1, num_seqs + 1)
    scale, window = default_scale(scale, dims.head_dim), check_window(sliding_window)
    out = _empty_like(q) if out is None else out
    if not on_gpu:
        return _cpu.paged_prefill_cpu(q, k_cache, v_cache, page_tables, context_lens, query_start_loc,
                                      scale, out, window, dims)
    if max_query_len is None:
        max_query_len = q.shape[0] - num_seqs + 1
    if not 1 <= max_query_len <= q.shape[0]:
        raise ValueError(f"max_query_len must be in 1..{q.shape[0]} (num_tokens), got {max_query_len}")
    from kernels.prefill import paged_prefill_cuda
    return paged_prefill_cuda(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale,
                              out, stream, window, dims, int(max_query_len))


def _empty_like(q):
    import numpy as np
    if isinstance(q, np.ndarray):
        return np.empty(q.shape, q.dtype)
    import cupy
    return cupy.empty(q.shape, q.dtype)
