"""store_kv: write new tokens' K and V into their slots of the paged cache (CUDA kernel + launcher)."""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from pagemem.kernels._arrays import as_device, launch

THREADS = 256


@functools.cache
def make_store_kv_kernel(words_per_row: int, page_size: int):
    """Copy K and V rows into the cache, 8 bytes per thread per step.

    Launch: 1-d grid-stride over num_tokens * num_kv_heads * words_per_row; thread i copies word
    i % words_per_row of row i // words_per_row (token, kv head) for both K and V.
    Preconditions: all arrays viewed as uint64 words; rows of a token whose slot lies outside
    [page_size, num_pages * page_size) (NULL_PAGE or beyond the pool) are skipped, not written.
    """
    W, P = words_per_row, page_size
    PSHIFT = P.bit_length() - 1

    @cuda.jit
    def store_kv_kernel(k_words, v_words, k_cache, v_cache, slot_mapping):
        # k_words, v_words: [num_tokens, num_kv_heads, W]; k_cache, v_cache: [num_pages, P, num_kv_heads, W]
        num_kv_heads = k_words.shape[1]
        n = k_words.shape[0] * num_kv_heads * W
        limit = k_cache.shape[0] * P
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            w = i % W
            row = i // W
            t = row // num_kv_heads
            h = row - t * num_kv_heads
            slot = slot_mapping[t]
            if P <= slot < limit:
                page, off = slot >> PSHIFT, slot & (P - 1)
                k_cache[page, off, h, w] = k_words[t, h, w]
                v_cache[page, off, h, w] = v_words[t, h, w]

    return store_kv_kernel


def store_kv_cuda(k, v, k_cache, v_cache, slot_mapping, stream) -> None:
    """Enqueue the copy on ``stream`` (CuPy; default current). Arguments already checked."""
    num_tokens, num_kv_heads, head_dim = k.shape
    words = head_dim * np.dtype(k.dtype).itemsize // 8
    n = num_tokens * num_kv_heads * words
    if n == 0:
        return
    kernel = make_store_kv_kernel(words, k_cache.shape[1])
    blocks = min(-(-n // THREADS), 65536)
    launch(kernel, blocks, THREADS, stream,
        as_device(k, np.uint64), as_device(v, np.uint64), as_device(k_cache, np.uint64),
        as_device(v_cache, np.uint64), as_device(slot_mapping))


def check_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] in the cache dtype, last axis contiguous;
    slot_mapping: [num_tokens] int32."""
    from pagemem.kernels._checks import check_cache, check_int_array
    check_cache(k_cache, v_cache)
    for name, x in (("k", k), ("v", v)):
        if np.dtype(x.dtype) != np.dtype(k_cache.dtype):
            raise TypeError(f"{name}: dtype {np.dtype(x.dtype)} differs from the cache's {np.dtype(k_cache.dtype)}")
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(k_cache.shape[2:]):
            raise ValueError(f"{name}: expected [num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}], "
                             f"got {tuple(x.shape)}")
        if x.strides[2] != x.itemsize or any(st % 8 for st in x.strides[:2]):
            raise ValueError(f"{name}: last axis must be contiguous, other strides multiples of 8 bytes; "
                             f"got strides {tuple(x.strides)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    check_int_array(slot_mapping, "slot_mapping", 1, k.shape[0])
