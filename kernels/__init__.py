"""kernels: paged-attention kernels as pure functions over arrays and a stream.

NumPy arrays run on the CPU path; CuPy arrays run Numba CUDA kernels.
``kernels.reference`` holds the NumPy oracles that specify every kernel.
"""
# Provisional CPU dispatch to the references; replaced by the real CPU path and CUDA launchers.
import numpy as _np

from kernels import reference as _ref


def store_kv(k, v, k_cache, v_cache, slot_mapping, stream=None):
    _ref.ref_store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_decode(q, k_cache, v_cache, page_tables, context_lens, scale=None, out=None, stream=None,
                 sliding_window=None):
    r = _ref.ref_paged_decode(q, k_cache, v_cache, page_tables, context_lens, scale, sliding_window)
    if out is None:
        return r.astype(q.dtype)
    out[...] = r
    return out


def paged_prefill(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale=None, out=None,
                  stream=None, sliding_window=None, max_query_len=None):
    r = _ref.ref_paged_prefill(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale,
                               sliding_window)
    if out is None:
        return r.astype(q.dtype)
    out[...] = r
    return out
