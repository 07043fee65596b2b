"""The CUDA kernels themselves, run by the Numba CUDA simulator on NumPy arrays at tiny sizes
(CI has no GPU). Blocks of 32 threads keep the simulator fast; the kernel code is the same."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import ATOL, DTYPES, assert_close, make_paged, queries, query_start_loc

from pagemem.kernels._checks import check_attention
from pagemem.kernels._device import SIM
from pagemem.kernels.reference import ref_paged_decode, ref_paged_prefill

pytestmark = pytest.mark.skipif(not SIM, reason="simulator tests (a CUDA device runs test_gpu.py)")
LENS = [1, 3, 4, 5, 23]   # page_size 4: 1, page_size - 1, page_size, page_size + 1, longer


def _decode(p, q, scale=0.5, window=0, threads_tc=None, **tuning):
    from pagemem.kernels.decode import paged_decode_cuda
    out = np.full(q.shape, np.nan, q.dtype)
    dims = check_attention(q, p.k, p.v, p.page_tables, p.context_lens, out, q.shape[0])
    tuning.setdefault("kernel", "simt")            # the tests below LENS use page_size 4 (CUDA cores)
    paged_decode_cuda(q, p.k, p.v, p.page_tables, p.context_lens, scale, out, None, window, dims,
                      threads=threads_tc or 32, **tuning)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_partitions", [1, 3])
@pytest.mark.parametrize("heads_major", [False, True])
def test_decode_v2(rng, dtype, num_partitions, heads_major):
    """v2 (uint64 loads, lane-group sums, online softmax) equals the reference, split-K or not,
    with either grid order (sequence-major or KV-head-major)."""
    p = make_paged(rng, LENS, dtype=dtype)
    q = queries(rng, len(LENS), 8, 16, dtype)
    out = _decode(p, q, num_partitions=num_partitions, heads_major=heads_major)
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5), dtype)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,lanes", [(2, 2, 4), (8, 2, 8), (16, 2, 4), (32, 1, 4)])
def test_decode_v2_gqa_ratios(rng, num_q_heads, num_kv_heads, lanes):
    """GQA 1, 4, 8 and MQA with 32 query heads (4 head chunks per KV head), several lane widths."""
    p = make_paged(rng, [1, 5, 23], num_kv_heads=num_kv_heads, head_dim=32)
    q = queries(rng, 3, num_q_heads, 32, np.float16)
    out = _decode(p, q, lanes=lanes)
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5), np.float16)


def test_decode_v2_window_with_split_and_page_chunks(rng, monkeypatch):
    """A sliding window over split partitions, with page ids staged two at a time."""
    import pagemem.kernels.paged_attention as pa
    monkeypatch.setattr(pa, "PAGES_CHUNK", 2)   # read at factory time: a fresh kernel
    pa.make_paged_decode_kernel.cache_clear()
    p = make_paged(rng, [23, 9], head_dim=16)
    q = queries(rng, 2, 4, 16, np.float16)
    out = _decode(p, q, window=10, num_partitions=2, tokens_per_group=2)
    pa.make_paged_decode_kernel.cache_clear()
    ref = ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5, 10)
    assert_close(out, ref, np.float16)


# The tensor-core decode: the simulator carries out mma.m16n8k16's fragment layout literally
# (kernels/_warp.py), so these check the kernel's use of it. One warp a block unless stated.
TC_CASES = [  # lens, q heads, kv heads, head_dim, page, dtype, window, partitions, warps, heads_major
    ([1, 7, 8, 9, 23], 4, 1, 32, 8, np.float16, 0, None, 1, True),         # page and tile edges, GQA 4
    ([23, 9], 7, 1, 40, 16, DTYPES[1], 10, 2, 1, True),                     # bf16, GQA 7, partial chunks, window, split
    ([40, 3], 16, 1, 16, 32, np.float16, 0, None, 2, False),               # MQA in two head chunks, 2 warps
    ([33], 2, 2, 24, 8, DTYPES[1], 0, 3, 1, True),                          # MHA, split into 3
]


@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: f"{c[1]}-{c[2]}h-d{c[3]}-p{c[4]}-{np.dtype(c[5])}")
def test_decode_tensor_cores(rng, case):
    lens, hq, hkv, d, page, dtype, window, parts, warps, heads_major = case
    p = make_paged(rng, lens, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=dtype)
    q = queries(rng, len(lens), hq, d, dtype)
    out = _decode(p, q, window=window, kernel="tc", num_partitions=parts, heads_major=heads_major,
                  threads_tc=32 * warps)
    ref = ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5, window or None)
    assert_close(out, ref, np.dtype(dtype))


def test_decode_kernel_choice(rng):
    """The plan takes the tensor cores for 16-bit caches with pages of 8 or more, the CUDA-core
    kernel otherwise, and refuses a forced tensor-core plan it cannot run, naming why."""
    from pagemem.kernels.decode_plan import plan_decode
    for page, dtype, want in [(8, np.float16, "tc"), (16, DTYPES[1], "tc"), (4, np.float16, "simt"),
                              (8, np.float32, "simt")]:
        p = make_paged(rng, [5], head_dim=16, page_size=page, dtype=dtype)
        plan = plan_decode(p.page_tables, p.context_lens, 4, p.k, kernel_path=True)
        assert plan.kernel_name == want, (page, dtype)
    with pytest.raises(ValueError, match="kernel='tc'.*fp16/bf16"):
        plan_decode(p.page_tables, p.context_lens, 4, p.k, kernel="tc", kernel_path=True)


def test_decode_plan_run_checks_each_call(rng):
    """run() on arrays of a subclass (its fast test fails, the full one passes) equals the
    reference; a cache view that does not start on a 16-byte boundary is refused before any
    launch (the packed relaunch, GPU only, makes the same test: test_gpu.py); so is an out of
    another dtype."""
    from pagemem.kernels.decode_plan import plan_decode

    class Sub(np.ndarray):
        pass
    p = make_paged(rng, [5, 9], head_dim=16, page_size=8, dtype=np.float16)
    q = queries(rng, 2, 4, 16, np.float16)
    plan = plan_decode(p.page_tables, p.context_lens, 4, p.k, kernel_path=True, scale=0.5)
    assert plan.kernel_name == "tc"
    out = plan.run(q.view(Sub), p.k.view(Sub), p.v.view(Sub), np.zeros_like(q).view(Sub))
    assert_close(np.asarray(out), ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5), np.dtype(np.float16))
    buf = np.zeros(p.kv.nbytes + 16, np.uint8)
    shifted = buf[2:2 + p.kv.nbytes].view(np.float16).reshape(p.kv.shape)   # 2 bytes past an aligned base
    k_bad = np.lib.stride_tricks.as_strided(shifted[:, 0, 0], p.k.shape, p.k.strides)
    with pytest.raises(ValueError, match="16-byte"):
        plan.run(q, k_bad, p.v)
    with pytest.raises(TypeError, match="q, out"):
        plan.run(q, p.k, p.v, np.zeros(q.shape, np.float32))


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
def test_decode_v1(rng, dtype):
    """The naive baseline kernel equals the reference too (it is the bench's yardstick)."""
    from bench.paged_decode_v1 import paged_decode_v1
    p = make_paged(rng, [1, 5, 9], dtype=dtype)
    q = queries(rng, 3, 4, 16, dtype)
    out = paged_decode_v1(q, p.k, p.v, p.page_tables, p.context_lens, 0.5, np.empty_like(q), window=4)
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.5, 4), dtype)


def test_store_kv_kernel(rng):
    """The copy kernel writes the given slots bit for bit and skips NULL_PAGE slots."""
    from pagemem.kernels.store_kv_kernel import store_kv_cuda
    p = make_paged(rng, [8], dtype=np.float16)
    want = p.kv.copy()
    k = rng.standard_normal((3, 2, 16)).astype(np.float16)
    v = rng.standard_normal((3, 2, 16)).astype(np.float16)
    slots = np.array([9, 2, 14], np.int32)           # slot 2 lies in NULL_PAGE: skipped
    store_kv_cuda(k, v, p.k, p.v, slots, None)
    for i in (0, 2):
        want[slots[i] // 4, 1, 0, slots[i] % 4], want[slots[i] // 4, 1, 1, slots[i] % 4] = k[i], v[i]
    np.testing.assert_array_equal(p.kv.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype,window", [(np.float16, None), (DTYPES[1], 3), (np.float32, None)])
@pytest.mark.parametrize("softmax_regs", [True, False])
def test_prefill_kernels(rng, dtype, window, softmax_regs):
    """Gather, softmax and scatter kernels around the GEMMs equal the reference prefill, with the
    one-read softmax (rows in registers, several words per thread) and with the three-pass one."""
    from pagemem.kernels.prefill import paged_prefill_cuda
    p = make_paged(rng, [5, 9], dtype=dtype)
    qsl = query_start_loc([2, 9])
    q = queries(rng, 11, 4, 16, dtype)
    out = np.full(q.shape, np.nan, dtype)
    dims = check_attention(q, p.k, p.v, p.page_tables, p.context_lens, out, 2)
    paged_prefill_cuda(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.5, out, None, window or 0, dims, 9,
                       threads=32, softmax_threads=2, softmax_regs=softmax_regs)
    from pagemem.kernels.prefill import _softmax_plan
    plan = _softmax_plan(p.page_tables.shape[1] * 4 * np.dtype(dtype).itemsize, 2)
    assert plan is not None and plan[1] > 1          # the one-read kernel, more than one word a thread
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.5, window)
    # Scores and probabilities are rounded to the cache dtype between the GEMMs: twice the
    # decode tolerance.
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=0, atol=2 * ATOL[np.dtype(dtype)])


def test_prefill_kernels_mixed_dtypes(rng):
    """float32 queries and output over an fp16 cache take the per-element gather and scatter
    (the same-dtype case moves uint64 words)."""
    from pagemem.kernels.prefill import paged_prefill_cuda
    p = make_paged(rng, [6, 3], dtype=np.float16)
    qsl = query_start_loc([4, 2])
    q = queries(rng, 6, 4, 16, np.float32)
    out = np.full(q.shape, np.nan, np.float32)
    dims = check_attention(q, p.k, p.v, p.page_tables, p.context_lens, out, 2)
    paged_prefill_cuda(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.5, out, None, 0, dims, 4,
                       threads=32, softmax_threads=8)
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.5)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2 * ATOL[np.dtype(np.float16)])
