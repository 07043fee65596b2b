"""Eviction policies: victims in policy order, through the pool and on their own."""
from __future__ import annotations

import pytest

from pagemem import FIFO, LRU, PagePool, PoolConfig, Priority
from pagemem.eviction import make_policy


def cached_pool(eviction, num_pages: int = 7) -> PagePool:
    """A pool whose usable pages are all allocated and prefix-cached (keys k1..k6)."""
    pool = PagePool(PoolConfig(num_pages, 4, 1, 1, 4, "float32", "cpu"), eviction=eviction)
    for p in pool.allocate(num_pages - 1):
        pool.cache_page(p, f"k{p}")
    return pool


def evict_order(pool: PagePool, n: int) -> list[int]:
    """Pages allocate() evicts, one call at a time, integrity checked after each."""
    order = []
    for _ in range(n):
        [p] = pool.allocate(1)
        order.append(p)
        pool.check_integrity()
    return order


def test_lru_evicts_least_recently_freed_and_touch_makes_young():
    pool = cached_pool("lru")
    pool.free([3, 1, 5])    # policy: 3 -> 1 -> 5                 (oldest first)
    pool.free([2])          # policy: 3 -> 1 -> 5 -> 2
    pool.touch([3])         # revived: 1 -> 5 -> 2
    pool.free([3])          # freed again, now youngest: 1 -> 5 -> 2 -> 3
    assert evict_order(pool, 4) == [1, 5, 2, 3]
    assert pool.num_evictions == 4 and pool.lookup("k1") is None


def test_fifo_keeps_first_age_across_revival():
    pool = cached_pool("fifo")
    pool.free([3, 1, 5])    # ages: 3(t0) 1(t1) 5(t2)
    pool.free([2])          # 2(t3)
    pool.touch([3])         # revived, keeps its age t0
    pool.free([3])          # queue by age: 3 -> 1 -> 5 -> 2
    assert evict_order(pool, 4) == [3, 1, 5, 2]


def test_priority_lowest_level_first_lru_within_level():
    pool = cached_pool("priority")
    pool.free([1, 2], priority=5)   # level 5: 1 -> 2
    pool.free([3], priority=0)      # level 0: 3
    pool.free([4, 5], priority=2)   # level 2: 4 -> 5
    pool.free([6], priority=0)      # level 0: 3 -> 6
    pool.touch([3])
    pool.free([3], priority=0)      # level 0: 6 -> 3
    # victims: level 0 (6, 3), then level 2 (4, 5), then level 5 (1, 2)
    assert evict_order(pool, 6) == [6, 3, 4, 5, 1, 2]


def test_clean_pages_go_before_any_cached_page():
    pool = PagePool(PoolConfig(5, 4, 1, 1, 4, "float32", "cpu"))
    a, b, c, d = pool.allocate(4)
    pool.cache_page(a, "ka")
    pool.free([a, b])       # a evictable, b clean free
    assert pool.allocate(1) == [b]
    assert pool.allocate(1) == [a] and pool.num_evictions == 1
    pool.check_integrity()


@pytest.mark.parametrize("policy", [LRU, FIFO, Priority])
def test_policy_protocol_on_its_own(policy):
    pol = policy()
    for p in (4, 2, 9):
        pol.add(p, 0)
    assert len(pol) == 3 and 2 in pol and 7 not in pol
    pol.remove(2)
    assert len(pol) == 2 and 2 not in pol
    assert pol.pop_victim() == 4 and pol.pop_victim() == 9 and len(pol) == 0


def test_make_policy_accepts_names_instances_and_rejects_others():
    assert isinstance(make_policy(None), LRU) and isinstance(make_policy("FIFO"), FIFO)
    custom = Priority()
    assert make_policy(custom) is custom
    with pytest.raises(ValueError, match="eviction"):
        make_policy("mru")
    with pytest.raises(TypeError, match="lacks add"):
        make_policy(object())


class MostRecentFirst:
    """A user policy in ten lines: evict the most recently freed page (MRU)."""

    def __init__(self) -> None:
        self._stack: dict[int, None] = {}

    def add(self, page_id: int, priority: int = 0) -> None:
        self._stack[page_id] = None

    def remove(self, page_id: int) -> None:
        del self._stack[page_id]

    def pop_victim(self) -> int:
        return self._stack.popitem()[0]

    def __len__(self) -> int:
        return len(self._stack)

    def __contains__(self, page_id: int) -> bool:
        return page_id in self._stack


def test_pool_accepts_a_user_written_policy():
    pool = cached_pool(MostRecentFirst())
    pool.free([1, 2, 3])    # stack: 1, 2, 3 (top)
    assert evict_order(pool, 3) == [3, 2, 1]
