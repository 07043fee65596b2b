"""SeqPages and pack_batch: slots, copy-on-write after fork, reverse-order free, one packed batch."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import NULL_PAGE, OutOfPages, PagePool, PoolConfig, SeqPages, pack_batch, slot


def make_pool(num_pages: int = 8, page_size: int = 4) -> PagePool:
    return PagePool(PoolConfig(num_pages, page_size, 1, 1, 2, "float32", "cpu"))


def write_tokens(pool: PagePool, slots: np.ndarray, values) -> None:
    """Store a marker value per token in layer 0's K, head 0, dim 0."""
    k, _ = pool.layer_kv(0)     # [num_pages, page_size, 1, 2], strided: index, never reshape
    k[slots // pool.page_size, slots % pool.page_size, 0, 0] = values


def read_tokens(seq: SeqPages) -> list[float]:
    k, _ = seq.pool.layer_kv(0)
    slots = seq.slots(0, seq.num_tokens)
    return k[slots // seq.pool.page_size, slots % seq.pool.page_size, 0, 0].tolist()


def test_append_allocates_pages_as_needed_and_returns_slots():
    pool = make_pool()
    seq = SeqPages(pool)
    assert seq.append(3).tolist() == [4, 5, 6]                 # page 1, offsets 0..2
    assert seq.append(2).tolist() == [7, 8]                    # fills page 1, starts page 2
    assert seq.page_table == [1, 2] and seq.num_tokens == 5
    assert seq.append(0).tolist() == []
    assert slot(2, 3, 4) == 11


def test_append_beyond_capacity_changes_nothing():
    pool = make_pool(num_pages=3)                              # 2 usable pages: 8 tokens
    seq = SeqPages(pool)
    seq.append(5)
    with pytest.raises(OutOfPages):
        seq.append(4)
    assert seq.num_tokens == 5 and seq.page_table == [1, 2] and pool.num_free_pages == 0
    assert not seq.can_append(4) and seq.can_append(3)
    pool.check_integrity()


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (1.5, TypeError)])
def test_bad_append_length(bad, exc):
    seq = SeqPages(make_pool())
    with pytest.raises(exc, match="num_new_tokens"):
        seq.append(bad)


def test_fork_shares_pages_and_copy_on_write_isolates_tokens():
    pool = make_pool()
    parent = SeqPages(pool)
    write_tokens(pool, parent.append(6), [10, 11, 12, 13, 14, 15])   # pages [1, 2], page 2 half full
    child = parent.fork()
    assert child.page_table == parent.page_table and pool.refcount(2) == 2
    write_tokens(pool, child.append(1), [99])                         # child copies page 2 first
    write_tokens(pool, parent.append(1), [16])                        # parent's page 2 is its own again
    assert child.page_table[0] == parent.page_table[0] == 1           # full page still shared
    assert child.page_table[1] != parent.page_table[1]
    assert read_tokens(parent) == [10, 11, 12, 13, 14, 15, 16]
    assert read_tokens(child) == [10, 11, 12, 13, 14, 15, 99]
    assert pool.refcount(1) == 2 and pool.refcount(2) == 1
    pool.check_integrity()


def test_fork_at_page_boundary_needs_no_copy():
    pool = make_pool()
    parent = SeqPages(pool)
    parent.append(4)
    child = parent.fork()
    assert child.num_pages_needed(1) == 1                             # a fresh page, no copy
    child.append(1)
    assert child.page_table[0] == parent.page_table[0]


def test_cow_when_pool_is_full_raises_and_keeps_sharing():
    pool = make_pool(num_pages=3)
    parent = SeqPages(pool)
    parent.append(6)                                                  # both pages used
    child = parent.fork()
    with pytest.raises(OutOfPages):
        child.append(1)
    assert child.page_table == parent.page_table == [1, 2] and child.num_tokens == 6
    pool.check_integrity()


def test_free_returns_pages_tail_first():
    pool = make_pool()
    other = SeqPages(pool)
    other.append(1)                                                   # page 1
    seq = SeqPages(pool)
    seq.append(9)                                                     # pages 2 3 4
    seq.free()
    # queue: 5 6 7 | 4 3 2  -> the tail page 4 is reused before the head page 2
    assert list(pool._free) == [5, 6, 7, 4, 3, 2]
    assert seq.page_table == [] and seq.num_tokens == 0
    pool.check_integrity()


def test_pack_batch_mixed_prefill_and_decode():
    pool = make_pool(num_pages=16)
    a, b, c = SeqPages(pool), SeqPages(pool), SeqPages(pool)
    a.append(5); b.append(1); c.append(9)                             # noqa: E702
    batch = pack_batch([a, b, c], query_lens=[2, 1, 9])
    np.testing.assert_array_equal(batch.context_lens, [5, 1, 9])
    np.testing.assert_array_equal(batch.query_start_loc, [0, 2, 3, 12])
    assert batch.page_tables.shape == (3, 3) and batch.page_tables.dtype == np.int32
    np.testing.assert_array_equal(batch.page_tables[1], [b.page_table[0], NULL_PAGE, NULL_PAGE])
    expected = np.concatenate([a.slots(3, 5), b.slots(0, 1), c.slots(0, 9)])
    np.testing.assert_array_equal(batch.slot_mapping, expected)
    assert (batch.max_context_len, batch.max_query_len, batch.num_seqs, batch.num_tokens) == (9, 9, 3, 12)


@pytest.mark.parametrize("q, match", [([0], "query_lens"), ([3], "query_lens"), ([1, 1], "2 query_lens")])
def test_pack_batch_bad_query_lens(q, match):
    pool = make_pool()
    seq = SeqPages(pool)
    seq.append(2)
    with pytest.raises(ValueError, match=match):
        pack_batch([seq], q)


def test_seqpages_rejects_inconsistent_state():
    pool = make_pool()
    with pytest.raises(ValueError, match="does not fit"):
        SeqPages(pool, pool.allocate(1), num_tokens=5)


def test_pack_batch_makes_one_host_to_device_transfer():
    class CountingXp:
        """Stands in for cupy: counts transfers, keeps NumPy arrays."""
        def __init__(self):
            self.calls = 0

        def asarray(self, a):
            self.calls += 1
            return np.array(a, copy=True)

    pool = make_pool(num_pages=16)
    seqs = [SeqPages(pool) for _ in range(3)]
    for n, s in zip([5, 9, 1], seqs):
        s.append(n)
    xp = CountingXp()
    batch = pack_batch(seqs, [1, 9, 1], xp)
    assert xp.calls == 1
    assert batch.page_tables.base is batch.context_lens.base is not None   # views of one buffer


def test_pack_batch_counts_leading_decode_rows():
    pool = make_pool(num_pages=16)
    seqs = [SeqPages(pool) for _ in range(4)]
    for s in seqs:
        s.append(5)
    assert pack_batch(seqs, [1, 1, 5, 1]).num_decode_seqs == 2
    assert pack_batch(seqs, [1, 1, 1, 1]).num_decode_seqs == 4
    assert pack_batch(seqs, [2, 1, 1, 1]).num_decode_seqs == 0


def test_try_grow_grows_or_changes_nothing():
    """try_grow: a decode token into a private partial page allocates nothing; a new page comes
    from the pool; a shared partial page is copied first; a full pool returns False untouched."""
    pool = make_pool(num_pages=4)                    # pages 1..3
    seq = SeqPages(pool)
    assert seq.try_grow(3) and seq.page_table == [1] and seq.num_tokens == 3
    assert seq.try_grow(1) and seq.page_table == [1] and seq.num_tokens == 4      # fills page 1
    assert seq.try_grow(1) and seq.page_table == [1, 2] and seq.num_tokens == 5   # page 2
    child = seq.fork()                                                             # page 2 shared
    assert child.try_grow(1) and child.page_table == [1, 3] and pool.refcount(2) == 1
    assert not seq.try_grow(4)                       # needs a page: none left
    assert seq.page_table == [1, 2] and seq.num_tokens == 5
    write_tokens(pool, np.array([8]), [7.0])         # slot 8 = page 2, offset 0
    assert seq.try_grow(1) and seq.num_tokens == 6 and read_tokens(seq)[4] == 7.0
    pool.check_integrity()


@pytest.mark.gpu
def test_copy_on_write_on_a_gpu():
    """fork, then append into the shared partial page of a CUDA pool: the page is copied (every
    layer's K and V) on the given stream before the child writes, so each sequence keeps its tokens."""
    import cupy as cp
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cuda"))
    rng = np.random.default_rng(0)
    parent = SeqPages(pool)
    parent.append(6)                                           # pages [1, 2], page 2 half full
    data = rng.standard_normal(pool.kv.shape).astype(np.float16)
    pool.kv[...] = cp.asarray(data)
    cp.cuda.Device().synchronize()                             # the test's own writes, on the default stream
    child = parent.fork()
    stream = cp.cuda.Stream(non_blocking=True)
    child.append(1, stream=stream)
    with stream:
        pool.kv[child.page_table[1], :, :, 2] = 9.0            # the child's new token, after the copy in stream order
    stream.synchronize()
    old, new = parent.page_table[1], child.page_table[1]
    assert child.page_table[0] == parent.page_table[0] and new != old and pool.refcount(old) == 1
    got = pool.kv.get()
    np.testing.assert_array_equal(got[old], data[old])                       # the parent's page untouched
    np.testing.assert_array_equal(got[new][:, :, :2], data[old][:, :, :2])   # its first two tokens copied
    assert (got[new][:, :, 2] == 9).all()
    pool.check_integrity()
