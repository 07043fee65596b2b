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
    pool._free.append(a[0])                # used and free at once
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


# ---- batches: many pages per call ----------------------------------------------------------------
def test_batch_allocate_and_free_keep_queue_order():
    """allocate(n) pops the front of the free queue; free appends in the order given."""
    pool = make_pool(num_pages=33)               # usable 1..32
    assert pool.allocate(10) == list(range(1, 11))
    order = [7, 2, 9, 1, 10, 3, 8, 4, 6, 5]
    pool.free(order)                             # queue: 11..32 7 2 9 1 10 3 8 4 6 5
    assert list(pool._free) == list(range(11, 33)) + order
    assert pool.allocate(25) == list(range(11, 33)) + [7, 2, 9]
    pool.check_integrity()


def test_batch_free_sends_cached_pages_to_the_policy_in_order():
    """In one free, cached pages join the policy (with the priority) and clean ones the free
    queue, each in the order given; allocate then takes clean pages before any victim."""
    pool = make_pool(num_pages=9, eviction="priority")
    pool.allocate(8)                             # 1..8; queue empty
    for p in (2, 5, 7):
        assert pool.cache_page(p, f"k{p}")
    pool.free([8, 7, 6, 5], priority=1)          # queue: 8 6        level 1: 7 5
    pool.free([4, 3, 2, 1], priority=0)          # queue: 8 6 4 3 1  level 0: 2
    assert list(pool._free) == [8, 6, 4, 3, 1]
    assert pool.allocate(8) == [8, 6, 4, 3, 1, 2, 7, 5]   # clean, then level 0, then level 1 oldest first
    assert pool.num_evictions == 3 and pool.lookup("k7") is None
    pool.check_integrity()


@pytest.mark.parametrize("ids, exc, match", [
    ([1, 2, 3, 1], ValueError, "double free"),   # a repeat, every page at refcount 1
    ([1, 2, NULL_PAGE], ValueError, "NULL_PAGE"),
    ([1, 2, 8], ValueError, "outside"),
    ([1, 2, -3], ValueError, "outside"),         # would index refcounts from the end
    ([1, 2, 5], ValueError, "double free"),      # 5 was never allocated
    ([1, 2, 3.0], TypeError, "ints"),
    ([1, True, 3], TypeError, "ints"),
    ([1, 2, "3"], TypeError, "ints"),
])
def test_bad_batch_free_changes_nothing(ids, exc, match):
    """A batch with one bad id anywhere raises the precise error and changes nothing."""
    pool = make_pool()
    pool.allocate(4)
    before = snapshot(pool)
    with pytest.raises(exc, match=match):
        pool.free(ids)
    assert_unchanged(pool, before)


@pytest.mark.parametrize("priority", [True, 1.5, "1"])
def test_batch_free_with_bad_priority_changes_nothing(priority):
    pool = make_pool()
    pages = pool.allocate(4)
    before = snapshot(pool)
    with pytest.raises(TypeError, match="priority"):
        pool.free(pages, priority)
    assert_unchanged(pool, before)


def test_batch_free_of_shared_pages_drops_one_reference_each():
    """Shared pages in a batch lose one reference per mention; a page joins the queue once, at 0."""
    pool = make_pool()
    a, b, c = pool.allocate(3)                   # queue: 4 5 6 7
    pool.share([a, b])
    pool.free([c, b, a])                         # a, b still used once; c freed
    assert [pool.refcount(p) for p in (a, b, c)] == [1, 1, 0]
    pool.share([b])
    pool.free([b, a, b])                         # b: 2 -> 1, a: 1 -> 0 joins, b: 1 -> 0 joins (once)
    assert list(pool._free) == [4, 5, 6, 7, c, a, b]
    pool.check_integrity()


@pytest.mark.parametrize("wrap", [tuple, np.array, lambda ids: [np.int64(p) for p in ids]],
                         ids=["tuple", "ndarray", "numpy-ints"])
def test_free_of_tuples_and_numpy_ints_matches_lists(wrap):
    """Tuples and NumPy ints take the general path to the same queue, holding Python ints."""
    pools = make_pool(), make_pool()
    for pool, ids in zip(pools, ([3, 1, 2], wrap([3, 1, 2]))):
        pool.allocate(4)
        pool.free(ids)
        pool.check_integrity()
    assert list(pools[1]._free) == list(pools[0]._free) == [5, 6, 7, 3, 1, 2]
    assert all(type(p) is int for p in pools[1]._free)


class ModelPool:
    """The pool's rules in plain lists, LRU eviction: the spec the batch paths must match."""

    def __init__(self, num_pages: int) -> None:
        self.rc, self.free_q, self.lru, self.cached = [0] * num_pages, list(range(1, num_pages)), [], set()

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_q) + len(self.lru):
            raise OutOfPages
        pages, self.free_q = self.free_q[:n], self.free_q[n:]
        victims, self.lru = self.lru[:n - len(pages)], self.lru[n - len(pages):]
        self.cached -= set(victims)
        for p in pages + victims:
            self.rc[p] = 1
        return pages + victims

    def free(self, ids) -> None:
        if any(type(p) is not int or not 0 < p < len(self.rc) for p in ids):
            raise ValueError if all(type(p) is int for p in ids) else TypeError
        if any(self.rc[p] < ids.count(p) for p in ids):
            raise ValueError
        for p in ids:
            self.rc[p] -= 1
            if self.rc[p] == 0:
                (self.lru if p in self.cached else self.free_q).append(p)


def test_random_batches_match_the_model():
    """Thousands of random allocate / share / cache / free calls of many pages, some invalid
    (repeats, free pages, NULL_PAGE, out of range, floats): same pages, queue orders and errors."""
    rng = np.random.default_rng(12)
    pool, model = make_pool(num_pages=40), ModelPool(40)
    for step in range(3000):
        used = [p for p in range(1, 40) if model.rc[p] > 0]
        op = rng.integers(4)
        if op == 0:
            n = int(rng.integers(1, 12))
            try:
                expected = model.allocate(n)
            except OutOfPages:
                with pytest.raises(OutOfPages):
                    pool.allocate(n)
                continue
            assert pool.allocate(n) == expected
        elif op == 1 and used:
            ids = rng.choice(used, size=min(len(used), int(rng.integers(1, 4))), replace=False).tolist()
            pool.share(ids)
            for p in ids:
                model.rc[p] += 1
        elif op == 2 and used:
            p = int(rng.choice(used))
            if pool.cache_page(p, ("key", step)):
                model.cached.add(p)
        elif op == 3 and used:
            ids = rng.permutation(used)[:int(rng.integers(1, 10))].tolist()
            if rng.random() < 0.3:               # corrupt the batch: a repeat or a bad id
                ids.insert(int(rng.integers(len(ids) + 1)),
                           [ids[0], 0, 40, -1, 2.0, int(rng.integers(1, 40))][int(rng.integers(6))])
            try:
                model.free(ids)
            except (TypeError, ValueError) as e:
                before = snapshot(pool)
                with pytest.raises(type(e)):
                    pool.free(ids)
                assert_unchanged(pool, before)
                continue
            pool.free(ids)
        assert pool._refcount == model.rc and list(pool._free) == model.free_q
        assert list(pool.policy._order) == model.lru
    pool.check_integrity()
