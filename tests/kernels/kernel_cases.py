"""Paged test cases: a page-major pool (strided layer views), NaN in NULL_PAGE, page tables
from a random permutation of page ids (never contiguous, no duplicates)."""
from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)]
# Absolute tolerances against the float64 reference, for O(1) outputs (softmax-weighted means of
# N(0,1) values): the output is rounded once to the storage dtype, so half an ulp at |x| < 2
# (fp16 1e-3, bf16 8e-3) plus float32 accumulation error (~1e-6); 2x margin for the rounding
# of inputs being shared by kernel and reference only up to float32 order of operations.
# These absolute bounds stay for kernels that round intermediates (prefill's scores and
# probabilities) to the cache dtype; assert_close (every output rounded once) uses TOL below.
ATOL = {np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.6e-2, np.dtype(np.float32): 2e-5}
# assert_close's (rtol, atol). bf16: outputs of long contexts are far below 1 (a mean of 2000 N(0,1)
# values is ~0.02), so 1.6e-2 absolute let a single wrong page of 16 tokens at context 2000 through
# in 49 of 200 trials (CPU path, head_dim 128, GQA 4). An output rounded once to bf16 is off by at
# most half an ulp, 2**-8 of its value, plus float32 accumulation (~1e-7 here): rtol 2**-7 is 2x
# that bound (the largest correct error measured was 0.44 of this tolerance), atol 1e-4 covers
# values near zero with 1000x margin over float32 error, and the same 200 wrong pages all fail
# (test_cpu_path.py plants one). fp16 and fp32 keep their absolute bounds, which caught every one.
TOL = {np.dtype(np.float16): (0.0, 2e-3), np.dtype(ml_dtypes.bfloat16): (2.0 ** -7, 1e-4),
       np.dtype(np.float32): (0.0, 2e-5)}


class Paged(NamedTuple):
    kv: np.ndarray            # [num_pages, 2 layers, 2, page_size, num_kv_heads, head_dim]
    k: np.ndarray             # layer-1 views [num_pages, page_size, num_kv_heads, head_dim]
    v: np.ndarray
    page_tables: np.ndarray   # [num_seqs, max_pages] int32, NULL_PAGE padded
    context_lens: np.ndarray  # [num_seqs] int32


def make_paged(rng, context_lens, num_kv_heads=2, head_dim=16, page_size=4, dtype=np.float16,
               extra_pages=3, pad_pages=1) -> Paged:
    need = [-(-c // page_size) for c in context_lens]
    num_pages = sum(need) + extra_pages + 1
    kv = rng.standard_normal((num_pages, 2, 2, page_size, num_kv_heads, head_dim)).astype(dtype)
    kv[0] = np.nan                                   # any read of NULL_PAGE poisons the output
    perm = rng.permutation(np.arange(1, num_pages, dtype=np.int32))
    page_tables = np.zeros((len(context_lens), max(need) + pad_pages), np.int32)
    start = 0
    for s, n in enumerate(need):
        page_tables[s, :n] = perm[start:start + n]
        start += n
    return Paged(kv, kv[:, 1, 0], kv[:, 1, 1], page_tables, np.asarray(context_lens, np.int32))


def queries(rng, num_tokens, num_q_heads, head_dim, dtype) -> np.ndarray:
    return rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(dtype)


def query_start_loc(query_lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)


def assert_close(out, ref, dtype) -> None:
    out = np.asarray(out, dtype=np.float32)
    assert not np.isnan(out).any(), "NaN in output: padding or NULL_PAGE was read"
    rtol, atol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)


_SPIN = r"""extern "C" __global__ void pagemem_test_spin(volatile const int* flag) {
    while (*flag == 0) { }   // holds its stream until the host writes the flag (mapped pinned memory)
}"""


def run_while_held(cp, stream, launch, out, timeout: float = 30.0):
    """(held, seen): call ``launch()``, which is to queue its work on ``stream``, while a
    one-thread kernel spinning on a flag in pinned host memory holds that stream. ``held``: the
    host came back with the stream's event not done and without the watchdog having to release
    the stream after ``timeout`` s (a call that waits on the stream from the host would need it).
    ``seen``: ``out`` as a copy made on a third stream saw it, after the legacy default stream
    drained (a launch there would have written it). The stream is released and drained after."""
    import threading
    other = cp.cuda.Stream(non_blocking=True)
    mem = cp.cuda.alloc_pinned_memory(4)
    flag = np.frombuffer(mem, np.int32, 1)
    flag[0] = 0
    spin = cp.RawKernel(_SPIN, "pagemem_test_spin")
    watchdog = threading.Timer(timeout, flag.__setitem__, (0, 1))
    watchdog.start()
    try:
        with stream:                                # RawKernel launches on the current stream
            spin((1,), (1,), (np.uint64(mem.ptr),))
        launch()
        done = cp.cuda.Event()
        done.record(stream)
        cp.cuda.Stream.null.synchronize()
        with other:
            probe = out.copy()
        seen = probe.get(stream=other)
        other.synchronize()                         # get(stream=...) only queues the copy
        held = flag[0] == 0 and not done.done
    finally:
        flag[0] = 1
        watchdog.cancel()
    stream.synchronize()
    return held, seen
