"""PagePool bookkeeping on the NumPy backend: allocation order, refcounts, errors that change nothing."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import NULL_PAGE, OutOfPages, PagePool, PoolConfig


def make_pool(num_pages: int = 8, page_size: int = 4, dtype: str = "float32", **kw) -> PagePool:
    return PagePool(PoolConfig(num_pages, page_size, 2, 2, 8, dtype, "cpu"), **kw)


def snapshot(pool: PagePool):
    """Everything a failed call must leave untouched."""
    return (list(pool._refcount), list(pool._free), dict(pool._key_of), len(pool.policy),
            pool.kv.copy())


def assert_unchanged(pool: PagePool, before) -> None:
    after = snapshot(pool)
    assert after[:4] == before[:4]
    np.testing.assert_array_equal(after[4], before[4])
    pool.check_integrity()


def test_layout_is_page_major():
    pool = make_pool(dtype="float16")
    assert pool.kv.shape == (8, 2, 2, 4, 2, 8)
    assert pool.kv.dtype == np.float16
    k, v = pool.layer_kv(1)
    assert k.shape == v.shape == (8, 4, 2, 8)
    k[3, 1, 0, 5] = 7.0
    assert pool.kv[3, 1, 0, 1, 0, 5] == 7.0  # a view, not a copy
    assert pool.kv[3].nbytes == pool.config.page_bytes


def test_allocate_never_hands_out_null_page_and_is_fifo_over_fresh_pages():
    pool = make_pool()
    pages = pool.allocate(7)
    assert pages == [1, 2, 3, 4, 5, 6, 7]
    assert NULL_PAGE not in pages
    assert pool.num_free_pages == 0 and not pool.can_allocate(1)
    pool.check_integrity()


def test_free_appends_in_given_order_lru():
    pool = make_pool()
    a = pool.allocate(3)             # [1, 2, 3]; queue: 4 5 6 7
    pool.free(a[::-1])               # queue: 4 5 6 7 3 2 1
    assert list(pool._free) == [4, 5, 6, 7, 3, 2, 1]
    assert pool.allocate(5) == [4, 5, 6, 7, 3]
    pool.check_integrity()


def test_share_counts_references():
    pool = make_pool()
    (p,) = pool.allocate(1)
    pool.share([p])
    pool.share([p])
    assert pool.refcount(p) == 3
    pool.free([p, p])
    assert pool.refcount(p) == 1 and p not in pool._free
    pool.free([p])
    assert p in pool._free
    pool.check_integrity()


def test_stats_counts_and_utilization():
    pool = make_pool()
    pool.allocate(3)
    s = pool.stats()
    assert (s.num_pages, s.num_free, s.num_cached, s.num_used) == (7, 4, 0, 3)
    assert s.utilization == pytest.approx(3 / 7)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError),
                                      ("2", TypeError), (8, OutOfPages)])
def test_bad_allocate_changes_nothing(bad, exc):
    pool = make_pool()
    pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(exc):
        pool.allocate(bad)
    assert_unchanged(pool, before)


def test_out_of_pages_is_runtime_error_with_counts():
    pool = make_pool()
    with pytest.raises(RuntimeError, match="asked for 8 pages, 7 free"):
        pool.allocate(8)


@pytest.mark.parametrize("ids, exc, match", [
    ([NULL_PAGE], ValueError, "NULL_PAGE"),
    ([8], ValueError, "outside"),
    ([-1], ValueError, "outside"),
    ([1, 1, 1], ValueError, "double free"),      # refcount 2, freed 3 times
    ([3], ValueError, "double free"),            # never allocated
    ([1.0], TypeError, "ints"),
])
def test_bad_free_changes_nothing(ids, exc, match):
    pool = make_pool()
    a = pool.allocate(2)
    pool.share([a[0]])
    before = snapshot(pool)
    with pytest.raises(exc, match=match):
        pool.free(ids)
    assert_unchanged(pool, before)


def test_free_of_valid_then_invalid_id_is_all_or_nothing():
    pool = make_pool()
    a = pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(ValueError):
        pool.free([a[0], 99])
    assert_unchanged(pool, before)


def test_share_of_free_page_rejected():
    pool = make_pool()
    a = pool.allocate(1)
    before = snapshot(pool)
    with pytest.raises(ValueError, match="is free"):
        pool.share([a[0], 5])
    assert_unchanged(pool, before)


def test_touch_revives_cached_page_and_rejects_clean_one():
    pool = make_pool()
    (p, q) = pool.allocate(2)
    assert pool.cache_page(p, "k0")
    pool.free([p, q])              # p evictable, q clean
    assert pool.lookup("k0") == p and p in pool.policy and q in pool._free
    before = snapshot(pool)
    with pytest.raises(ValueError, match="not cached"):
        pool.touch([p, q])
    assert_unchanged(pool, before)
    pool.touch([p])
    assert pool.refcount(p) == 1 and p not in pool.policy
    pool.check_integrity()


def test_clean_pages_are_handed_out_before_cached_ones_are_evicted():
    pool = make_pool(num_pages=4)          # usable: 1 2 3
    p = pool.allocate(3)
    pool.cache_page(p[0], "a")
    pool.free(p)                           # free: 2 3, evictable: 1
    assert pool.allocate(2) == [2, 3]
    assert pool.lookup("a") == 1 and pool.num_evictions == 0
    assert pool.allocate(1) == [1]         # now the cached page is evicted
    assert pool.lookup("a") is None and pool.num_evictions == 1
    pool.check_integrity()


def test_cache_page_rejects_duplicates_without_change():
    pool = make_pool()
    a, b = pool.allocate(2)
    assert pool.cache_page(a, "x")
    assert not pool.cache_page(b, "x")     # key taken
    assert not pool.cache_page(a, "y")     # page already keyed
    assert pool.lookup("y") is None and not pool.is_cached(b)
    pool.check_integrity()


def test_copy_page_copies_every_layer():
    pool = make_pool()
    a, b = pool.allocate(2)
    pool.kv[a] = np.arange(pool.kv[a].size, dtype=np.float32).reshape(pool.kv[a].shape)
    pool.copy_page(a, b)
    np.testing.assert_array_equal(pool.kv[b], pool.kv[a])


def test_check_integrity_detects_corruption():
    pool = make_pool()
    a = pool.allocate(2)
    pool._free[a[0]] = None                # used and free at once
    with pytest.raises(RuntimeError, match="two states"):
        pool.check_integrity()
    pool = make_pool()
    a = pool.allocate(2)
    pool._refcount[a[1]] = 0               # leaked: neither used nor free
    with pytest.raises(RuntimeError, match=r"\+ used 1 != 7"):
        pool.check_integrity()


def test_layer_out_of_range():
    with pytest.raises(ValueError, match="layer"):
        make_pool().layer_kv(2)


def test_bfloat16_pool_on_cpu():
    pool = make_pool(dtype="bfloat16")
    assert pool.kv.dtype.name == "bfloat16"
    assert pool.config.page_bytes == 2 * 2 * 4 * 2 * 8 * 2
