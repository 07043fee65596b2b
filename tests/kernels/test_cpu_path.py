"""The NumPy CPU path (what CPU generation runs) against the references."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import DTYPES, assert_close, make_paged, queries, query_start_loc

from pagemem import kernels
from pagemem.kernels.reference import ref_paged_decode, ref_paged_prefill

EDGE_LENS = [1, 3, 4, 5, 23]   # page_size 4: 1, page_size - 1, page_size, page_size + 1, longer


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1), (16, 2)])
def test_decode_matches_reference(rng, dtype, num_q_heads, num_kv_heads):
    """Decode equals the reference for every dtype and GQA ratio 1/4/8 and MQA, at edge lengths."""
    p = make_paged(rng, EDGE_LENS, num_kv_heads=num_kv_heads, dtype=dtype)
    q = queries(rng, len(EDGE_LENS), num_q_heads, 16, dtype)
    out = kernels.paged_decode(q, p.k, p.v, p.page_tables, p.context_lens)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens), dtype)


@pytest.mark.parametrize("window", [1, 4, 6, 100])
def test_decode_sliding_window(rng, window):
    """Only the last ``window`` tokens count; windows past the context change nothing."""
    p = make_paged(rng, EDGE_LENS, head_dim=64, page_size=8)
    q = queries(rng, len(EDGE_LENS), 8, 64, np.float16)
    out = kernels.paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, scale=0.3, sliding_window=window)
    ref = ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, 0.3, window)
    assert_close(out, ref, np.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_matches_reference(rng, dtype, window):
    """Ragged prefill (whole prompts, chunked continuations, single tokens) equals the reference."""
    ctx = [1, 4, 5, 23, 300]
    qlens = [1, 4, 2, 23, 290]        # seq 2 and 4 continue a cached prefix
    p = make_paged(rng, ctx, num_kv_heads=2, dtype=dtype)
    qsl = query_start_loc(qlens)
    q = queries(rng, int(qsl[-1]), 8, 16, dtype)
    out = kernels.paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, sliding_window=window)
    ref = ref_paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, qsl, None, window)
    assert_close(out, ref, dtype)


def test_out_argument_is_written_and_returned(rng):
    """A given ``out`` (float32 for fp16 inputs, strided) is filled in place and returned."""
    p = make_paged(rng, [5, 9])
    q = queries(rng, 2, 4, 16, np.float16)
    out = np.full((2, 4, 32), np.nan, np.float32)[:, :, ::2]
    assert kernels.paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, out=out) is out
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens), np.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_writes_slots(rng, dtype):
    """store_kv puts token i in page slot // page_size, offset slot % page_size, nothing else."""
    p = make_paged(rng, [8], dtype=dtype)
    before = p.kv.copy()
    k = rng.standard_normal((3, 2, 16)).astype(dtype)
    v = rng.standard_normal((3, 2, 16)).astype(dtype)
    slots = np.array([4 * 2 + 1, 4 * 5, 4 * 3 + 3], np.int32)
    kernels.store_kv(k, v, p.k, p.v, slots)
    np.testing.assert_array_equal(p.k[slots // 4, slots % 4], k)
    np.testing.assert_array_equal(p.v[slots // 4, slots % 4], v)
    p.kv[slots // 4, 1, 0, slots % 4] = before[slots // 4, 1, 0, slots % 4]
    p.kv[slots // 4, 1, 1, slots % 4] = before[slots // 4, 1, 1, slots % 4]
    np.testing.assert_array_equal(p.kv.view(np.uint8), before.view(np.uint8))  # bitwise: NaN pages too


def test_decode_of_a_page_table_with_null_page_raises(rng):
    """A NULL_PAGE inside a sequence's live pages is a caller bug, not silent NaN."""
    p = make_paged(rng, [9])
    p.page_tables[0, 1] = 0
    q = queries(rng, 1, 2, 16, np.float16)
    with pytest.raises(ValueError, match="page_tables"):
        kernels.paged_decode(q, p.k, p.v, p.page_tables, p.context_lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_tolerance_catches_a_single_wrong_page(rng, dtype):
    """A page table with one page swapped for a spare one, at a 2000-token context, fails
    assert_close in every dtype (bf16's old 1.6e-2 absolute bound missed about a quarter), while
    the right table passes."""
    for _ in range(8):
        p = make_paged(rng, [2000], num_kv_heads=2, head_dim=128, page_size=16, dtype=dtype, extra_pages=1)
        q = queries(rng, 1, 8, 128, dtype)
        ref = ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens)
        assert_close(kernels.paged_decode(q, p.k, p.v, p.page_tables, p.context_lens), ref, dtype)
        spare = np.setdiff1d(np.arange(1, p.kv.shape[0]), p.page_tables[0])   # the one page no table uses
        wrong = p.page_tables.copy()
        wrong[0, rng.integers(125)] = spare[0]
        with pytest.raises(AssertionError):
            assert_close(kernels.paged_decode(q, p.k, p.v, wrong, p.context_lens), ref, dtype)
