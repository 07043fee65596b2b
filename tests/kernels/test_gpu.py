"""CUDA kernels at real sizes on a GPU (skipped without one), against the references."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import ATOL, DTYPES, assert_close, make_paged, queries, query_start_loc, run_while_held

from pagemem import kernels
from pagemem.kernels.reference import ref_paged_decode, ref_paged_prefill, ref_store_kv

pytestmark = pytest.mark.gpu


def _to_gpu(*arrays):
    import cupy as cp
    return [cp.asarray(a) for a in arrays]


LENS = [1, 15, 16, 17, 300, 2000]   # page_size 16 edges and long
# Prefill keeps scores and probabilities in the cache dtype between the two cuBLAS products:
# a score |x| < 8 rounded to fp16 is off by up to 4e-3 (bf16: 3e-2), which moves the output by
# about as much, on top of the output rounding: 4x the decode tolerances.
PREFILL_ATOL = {dt: 4 * a for dt, a in ATOL.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_decode_head_dims(rng, dtype, head_dim, kernel):
    """Both decode kernels (tensor cores for 16-bit caches, CUDA cores for any) equal the
    reference for every supported head_dim and dtype (GQA 4)."""
    if kernel == "tc" and dtype == np.float32:
        pytest.skip("the tensor-core kernel serves 16-bit caches (fp32 takes the CUDA-core kernel)")
    p = make_paged(rng, LENS, num_kv_heads=2, head_dim=head_dim, page_size=16, dtype=dtype)
    q = queries(rng, len(LENS), 8, head_dim, dtype)
    q_gpu, k, v, pt, lens = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens)
    plan = kernels.plan_decode(pt, lens, 8, k, kernel=kernel)
    assert plan.kernel_name == kernel
    out = plan.run(q_gpu, k, v)
    assert_close(out.get(), ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens), dtype)
    if dtype != np.float32:     # and the default picks the tensor cores
        assert kernels.plan_decode(pt, lens, 8, k).kernel_name == "tc"


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (16, 4), (32, 4), (28, 4), (12, 4), (32, 1)])
def test_decode_gqa_and_pages(rng, page_size, num_q_heads, num_kv_heads):
    """GQA ratios 1/3/4/7/8 and MQA (32 query heads on one KV head) at page sizes 8, 16, 32."""
    p = make_paged(rng, LENS, num_kv_heads=num_kv_heads, head_dim=128, page_size=page_size)
    q = queries(rng, len(LENS), num_q_heads, 128, np.float16)
    out = kernels.paged_decode(*_to_gpu(q, p.k, p.v, p.page_tables, p.context_lens), sliding_window=700)
    ref = ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, None, 700)
    assert_close(out.get(), ref, np.float16)


@pytest.mark.parametrize("num_partitions", [None, 1, 3, 64])
def test_decode_split_k(rng, num_partitions):
    """Few long sequences go through split-K (the rule, and forced counts) with the same result."""
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.decode import paged_decode_cuda
    p = make_paged(rng, [5000, 20000, 1], num_kv_heads=2, head_dim=128, page_size=16)
    q = queries(rng, 3, 8, 128, np.float16)
    args = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens)
    out = args[0].copy()
    dims = check_attention(*args, out, 3)
    paged_decode_cuda(*args, 0.1, out, None, 0, dims, num_partitions=num_partitions)
    assert_close(out.get(), ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.1), np.float16)


SIMT = dict(kernel="simt")
TUNINGS = [dict(heads_major=False, **SIMT), dict(heads_major=True, **SIMT), dict(tokens_per_group=2, **SIMT),
           dict(max_registers=96, **SIMT), dict(max_registers=80, **SIMT), dict(max_registers=None, **SIMT),
           dict(threads=256, **SIMT), dict(lanes=32, **SIMT), dict(lanes=16, tokens_per_group=4, threads=64, **SIMT),
           dict(kernel="tc"), dict(kernel="tc", heads_major=False), dict(kernel="tc", threads=32),
           dict(kernel="tc", threads=64), dict(kernel="tc", threads=256), dict(kernel="tc", max_registers=128)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("head_dim,page_size,num_partitions", [(64, 16, None), (64, 8, 3), (128, 32, 1), (96, 16, 2)])
def test_decode_tunings(rng, tuning, head_dim, page_size, num_partitions):
    """Launch settings the bench sweeps (grid order, lanes, tokens per group, threads, register
    cap) give the reference result, split or not, with NULL_PAGE-padded page tables."""
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.decode import paged_decode_cuda
    p = make_paged(rng, [1, 15, 17, 300, 700], num_kv_heads=2, head_dim=head_dim, page_size=page_size, pad_pages=5)
    q = queries(rng, 5, 8, head_dim, np.float16)
    args = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens)
    out = args[0].copy()
    dims = check_attention(*args, out, 5)
    paged_decode_cuda(*args, 0.1, out, None, 0, dims, num_partitions=num_partitions, **tuning)
    assert_close(out.get(), ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.1), np.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("give_max", [True, False], ids=["max_query_len", "no-max_query_len"])
def test_prefill(rng, dtype, window, give_max):
    """Ragged prefill with cached prefixes equals the reference (the path "auto" picks), with the
    caller's max_query_len and with the bound paged_prefill derives without it."""
    ctx, qlens = [1, 17, 300, 1000], [1, 17, 50, 1000]
    p = make_paged(rng, ctx, num_kv_heads=2, head_dim=128, page_size=16, dtype=dtype)
    qsl = query_start_loc(qlens)
    q = queries(rng, int(qsl[-1]), 8, 128, dtype)
    out = kernels.paged_prefill(*_to_gpu(q, p.k, p.v, p.page_tables, p.context_lens, qsl),
                                sliding_window=window, max_query_len=max(qlens) if give_max else None)
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, None, window)
    out = out.get().astype(np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, rtol=0, atol=PREFILL_ATOL[np.dtype(dtype)])


def _flash(rng, dtype, ctx, qlens, num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=16, window=None,
           tiling=None, strided_q=False):
    """The fused kernel (path='flash') on NaN-filled outputs against the reference; q optionally a
    view into a wider [tokens, (q + k + v heads) * head_dim] projection, as a model produces it."""
    import cupy as cp
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.prefill import paged_prefill_cuda
    p = make_paged(rng, ctx, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype,
                   pad_pages=3)
    qsl = query_start_loc(qlens)
    n = int(qsl[-1])
    q = queries(rng, n, num_q_heads, head_dim, dtype)
    gq, *g = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens, qsl)
    if strided_q:
        wide = cp.full((n, (num_q_heads + 2 * num_kv_heads) * head_dim), cp.nan, dtype)
        wide[:, :num_q_heads * head_dim] = gq.reshape(n, -1)
        gq = wide[:, :num_q_heads * head_dim].reshape(n, num_q_heads, head_dim)
        assert not gq.flags.c_contiguous
    out = cp.full(q.shape, cp.nan, dtype)
    dims = check_attention(gq, *g[:4], out, len(ctx))
    paged_prefill_cuda(gq, *g, 0.1, out, None, window or 0, dims, max(qlens), path="flash", tiling=tiling)
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.1, window)
    got = out.get().astype(np.float32)
    assert not np.isnan(got).any(), "a row was not written, or padding / NULL_PAGE was read"
    np.testing.assert_allclose(got, ref, rtol=0, atol=PREFILL_ATOL[np.dtype(dtype)])


# context lengths and new tokens: single tokens, page edges, tile edges (64 rows, 64 keys),
# chunked prefill (a cached prefix before the new tokens) and a long full prompt
FLASH_CTX, FLASH_QLENS = [1, 15, 17, 64, 65, 300, 1000, 2000], [1, 15, 9, 64, 65, 50, 1000, 700]


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128])
def test_prefill_flash_head_dims(rng, dtype, head_dim):
    """The fused tensor-core kernel for every head_dim it takes, fp16 and bf16 (GQA 4)."""
    _flash(rng, dtype, FLASH_CTX, FLASH_QLENS, head_dim=head_dim)


@pytest.mark.parametrize("pack", [False, True], ids=["per-head", "packed"])
@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (16, 4), (32, 4), (8, 1), (32, 1), (14, 2)])
def test_prefill_flash_gqa_pages_window(rng, pack, page_size, num_q_heads, num_kv_heads):
    """GQA 1/4/7/8 and MQA (8 and 32 heads) at page sizes 8, 16, 32, with a sliding window, q a
    strided view; packed, GQA 7 leaves 2 of a block's 128 rows unused (18 tokens x 7 heads)."""
    from pagemem.kernels.prefill_flash import Tiling
    _flash(rng, np.float16, FLASH_CTX, FLASH_QLENS, num_q_heads, num_kv_heads, page_size=page_size,
           window=100, strided_q=True, tiling=Tiling(pack=pack))


# (warps, m_tiles, block_n, q_regs, min_blocks, pack, sub_n): the shapes the bench sweeps
# (warps, m_tiles, block_n, q_regs, min_blocks, pack, sub_n, stages): shapes the bench sweeps
TILINGS = [(4, 1, 64, True), (8, 1, 64, True, 1, True), (4, 2, 32, False), (8, 1, 32, False, 2, True),
           (4, 2, 64, False, 1, True, 32), (4, 2, 128, False, 1, False, 32), (2, 1, 32, True, 1, True),
           (4, 2, 64, False, 1, True, 0, 3), (4, 1, 32, True, 1, True, 0, 4)]


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("window", [None, 1, 64, 1000])
def test_prefill_flash_tilings_and_windows(rng, tiling, window):
    """Block shapes the bench sweeps (warps, 16-row tiles a warp, keys a tile, Q in registers or
    shared memory, a KV head's query group packed into a block's rows, sub-tiles) and windows from
    one key to wider than a tile; bf16, head_dim 96 and 128."""
    from pagemem.kernels.prefill_flash import Tiling
    for head_dim in (96, 128):
        _flash(rng, DTYPES[1], FLASH_CTX, FLASH_QLENS, head_dim=head_dim, tiling=Tiling(*tiling), window=window)


def test_prefill_flash_group_wider_than_a_block(rng):
    """A packed tiling whose block holds fewer rows than a query group runs unpacked."""
    from pagemem.kernels.prefill_flash import Tiling
    _flash(rng, np.float16, [70, 5], [70, 5], num_q_heads=64, num_kv_heads=1, tiling=Tiling(2, 1, 32, True, 1, True))


def test_prefill_flash_refuses_what_it_cannot_run(rng):
    """path='flash' names what it needs (fp16/bf16, head_dim up to 128, a positive scale);
    path='auto' takes the cuBLAS route for those calls."""
    import cupy as cp
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.prefill import paged_prefill_cuda
    for dtype, head_dim, scale in ((np.float32, 128, 0.1), (np.float16, 256, 0.1), (np.float16, 64, -0.1)):
        p = make_paged(rng, [40], head_dim=head_dim, page_size=16, dtype=dtype)
        q = queries(rng, 40, 4, head_dim, dtype)
        g = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens, query_start_loc([40]))
        out = cp.empty_like(g[0])
        dims = check_attention(*g[:5], out, 1)
        with pytest.raises(ValueError, match="path='flash' needs"):
            paged_prefill_cuda(*g, scale, out, None, 0, dims, 40, path="flash")
        paged_prefill_cuda(*g, scale, out, None, 0, dims, 40, path="auto")
        ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, query_start_loc([40]), scale)
        np.testing.assert_allclose(out.get().astype(np.float32), ref, rtol=0, atol=PREFILL_ATOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=str)
@pytest.mark.parametrize("context_len", [500, 1000, 2000, 4000, 8000, 9000])
@pytest.mark.parametrize("softmax_regs", [True, False], ids=["one-read", "three-pass"])
def test_prefill_every_softmax_class(rng, dtype, context_len, softmax_regs):
    """Score rows of every one-read class (up to 8192 fp16 / 4096 fp32 keys), rows past them
    (the three-pass kernel the launcher falls back to), and the three-pass kernel forced."""
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.prefill import _softmax_plan, paged_prefill_cuda
    ctx, qlens = [context_len, context_len // 3], [8, 5]
    p = make_paged(rng, ctx, num_kv_heads=2, head_dim=64, page_size=16, dtype=dtype)
    qsl = query_start_loc(qlens)
    q = queries(rng, int(qsl[-1]), 8, 64, dtype)
    g = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens, qsl)
    import cupy as cp
    out = cp.full(q.shape, cp.nan, dtype)
    dims = check_attention(*g[:5], out, 2)
    paged_prefill_cuda(*g, 0.125, out, None, 0, dims, max(qlens), softmax_regs=softmax_regs, path="gemm")
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.125, None)
    if softmax_regs:
        row_bytes = p.page_tables.shape[1] * 16 * np.dtype(dtype).itemsize
        assert (_softmax_plan(row_bytes, None) is None) == (row_bytes > 8192 * 2)
    got = out.get().astype(np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=0, atol=PREFILL_ATOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv(rng, dtype):
    """store_kv writes exactly the given slots, bit for bit, on a strided layer view: what
    ref_store_kv writes, nothing else."""
    import cupy as cp
    p = make_paged(rng, [64, 64], num_kv_heads=4, head_dim=128, page_size=16, dtype=dtype)
    kv = cp.asarray(p.kv)
    slots = (rng.permutation(np.arange(16, p.kv.shape[0] * 16))[:50]).astype(np.int32)
    k = rng.standard_normal((50, 4, 128)).astype(dtype)
    v = rng.standard_normal((50, 4, 128)).astype(dtype)
    kernels.store_kv(*_to_gpu(k, v), kv[:, 1, 0], kv[:, 1, 1], cp.asarray(slots))
    want = p.kv.copy()
    ref_store_kv(k, v, want[:, 1, 0], want[:, 1, 1], slots)
    np.testing.assert_array_equal(kv.get().view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_skips_null_page_and_out_of_pool_slots(rng, dtype):
    """The rule CUDA-graph padding relies on: tokens whose slot is in NULL_PAGE, negative or past
    the pool are skipped; the rest are written as ref_store_kv writes them. The pool is a view
    inside a larger array with guard pages on both sides, so a write past either end shows."""
    import cupy as cp
    p = make_paged(rng, [64, 64], num_kv_heads=4, head_dim=128, page_size=16, dtype=dtype)
    num_pages, guard = p.kv.shape[0], 3
    fill = np.full((guard, *p.kv.shape[1:]), 7, dtype)
    big = np.concatenate([fill, p.kv, fill])          # [guard + num_pages + guard, 2, 2, 16, 4, 128]
    dev = cp.asarray(big)
    pool = dev[guard:guard + num_pages]
    valid = rng.permutation(np.arange(16, num_pages * 16))[:40]
    padding = np.concatenate([rng.integers(0, 16, 4), [-1, -16 * guard],     # NULL_PAGE, before the pool
                              num_pages * 16 + rng.integers(0, 16 * guard, 4)])  # past the pool
    slots = rng.permutation(np.concatenate([valid, padding])).astype(np.int32)
    k = rng.standard_normal((len(slots), 4, 128)).astype(dtype)
    v = rng.standard_normal((len(slots), 4, 128)).astype(dtype)
    kernels.store_kv(*_to_gpu(k, v), pool[:, 1, 0], pool[:, 1, 1], cp.asarray(slots))
    want = big.copy()
    keep = (slots >= 16) & (slots < num_pages * 16)
    view = want[guard:guard + num_pages]
    ref_store_kv(k[keep], v[keep], view[:, 1, 0], view[:, 1, 1], slots[keep])
    np.testing.assert_array_equal(dev.get().view(np.uint8), want.view(np.uint8))   # NULL_PAGE's NaNs too


def test_decode_runs_on_the_given_stream(rng):
    """The launch is queued on ``stream`` and only there: with that stream held by a kernel
    spinning on a host flag, the legacy default stream drains, a copy of ``out`` made on a third
    stream still sees the NaN it was filled with, and the stream's event is not done; released,
    the stream finishes the decode with the reference result. Neither call blocks the host (a
    hidden synchronize would wait on the spinning kernel: a watchdog releases it and the test fails)."""
    import cupy as cp
    p = make_paged(rng, LENS, num_kv_heads=2, head_dim=128, page_size=16)
    q = queries(rng, len(LENS), 8, 128, np.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        args = _to_gpu(q, p.k, p.v, p.page_tables, p.context_lens)
        out = cp.full(q.shape, cp.nan, cp.float16)
    kernels.paged_decode(*args, out=out.copy(), stream=stream)        # compile outside the test
    stream.synchronize()
    held, seen = run_while_held(cp, stream, lambda: kernels.paged_decode(*args, out=out, stream=stream), out)
    assert held, "the host was blocked until the stream drained, or the decode ran on another stream"
    assert np.isnan(seen).all(), "out was written while the given stream was held"
    assert_close(out.get(), ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens), np.float16)


def test_one_shot_decode_reuses_its_plan_with_new_values_in_the_same_arrays(rng):
    """paged_decode caches a plan per batch arrays; the arrays' values (other pages, other
    lengths) change between calls and each call still equals the reference."""
    import cupy as cp
    from pagemem.kernels import decode
    p = make_paged(rng, [700, 40, 1300], num_kv_heads=2, head_dim=128, page_size=16, pad_pages=4)
    k, v = _to_gpu(p.k, p.v)
    pt, lens = cp.asarray(p.page_tables), cp.asarray(p.context_lens)
    decode._plans.clear()
    for new_lens in ([700, 40, 1300], [5, 1000, 17], [1, 1, 1]):
        perm = rng.permutation(p.page_tables.shape[1])
        host_pt = p.page_tables[:, perm]                       # other pages, NULL_PAGE where unused
        host_lens = np.array(new_lens, np.int32)
        host_pt[host_pt == 0] = 1
        pt.set(host_pt)
        lens.set(host_lens)
        q = queries(rng, 3, 8, 128, np.float16)
        out = kernels.paged_decode(cp.asarray(q), k, v, pt, lens)
        assert_close(out.get(), ref_paged_decode(q, p.k, p.v, host_pt, host_lens), np.float16)
    assert len(decode._plans) == 1
