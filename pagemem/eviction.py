"""Eviction policies: which cached free page to give up when the pool needs one.

A page whose refcount drops to 0 but whose contents are still indexed by the
prefix cache is *evictable*: it counts as free, yet a later request with the
same prefix can revive it. The pool hands out clean free pages first and asks
its policy for a victim only when none is left.

A policy is any object with these four methods (all O(1) or O(log n)):

    add(page_id, priority)  the page became evictable (refcount 0, still cached)
    remove(page_id)         the page was revived or dropped; forget it
    pop_victim() -> int     choose, forget and return the page to evict
    __len__()               number of evictable pages
    __contains__(page_id)

The built-in policies check their arguments: ``add`` takes an int page id (>= 1) not already in
the policy and an int priority, ``remove`` a page in the policy, ``pop_victim`` a non-empty
policy; anything else raises TypeError or ValueError naming the argument, changing nothing.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Protocol

from pagemem.config import check_int


class EvictionPolicy(Protocol):
    def add(self, page_id: int, priority: int = 0) -> None: ...
    def remove(self, page_id: int) -> None: ...
    def pop_victim(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, page_id: int) -> bool: ...


def _check_add(policy, page_id, priority) -> tuple[int, int]:
    """The checks every built-in ``add`` makes before changing anything (cheap for Python ints);
    returns (page_id, priority) as Python ints."""
    if type(page_id) is not int or page_id < 1:
        page_id = check_int(page_id, "page_id", 1)
    if type(priority) is not int:
        priority = check_int(priority, "priority")
    if page_id in policy:
        raise ValueError(f"page_id {page_id} is already evictable in this policy")
    return page_id, priority


def _missing(page_id) -> ValueError:
    return ValueError(f"page_id {page_id!r} is not evictable in this policy")


def _empty() -> ValueError:
    return ValueError("pop_victim: the policy holds no evictable page")


def _hashable_id(page_id) -> None:
    """TypeError unless ``page_id`` is an int (2.0 would find page 2 in a dict)."""
    if type(page_id) is not int:
        check_int(page_id, "page_id")


class LRU:
    """Least recently freed first. An OrderedDict is a C doubly linked list: O(1) everywhere."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, page_id: int, priority: int = 0) -> None:
        page_id, _ = _check_add(self, page_id, priority)
        self._order[page_id] = None

    def remove(self, page_id: int) -> None:
        _hashable_id(page_id)
        try:
            del self._order[page_id]
        except KeyError:
            raise _missing(page_id) from None

    def pop_victim(self) -> int:
        if not self._order:
            raise _empty()
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, page_id: int) -> bool:
        _hashable_id(page_id)
        return page_id in self._order


class FIFO:
    """First cached, first evicted: a page's age is the first time it became evictable.

    Reviving a page does not make it younger (unlike LRU). A heap keyed by that
    first time, with lazy deletion of revived entries.
    """

    def __init__(self) -> None:
        self._born: dict[int, int] = {}      # page_id -> first time it became evictable
        self._live: set[int] = set()
        self._heap: list[tuple[int, int]] = []
        self._clock = itertools.count()

    def add(self, page_id: int, priority: int = 0) -> None:
        page_id, _ = _check_add(self, page_id, priority)
        born = self._born.setdefault(page_id, next(self._clock))
        self._live.add(page_id)
        heapq.heappush(self._heap, (born, page_id))
        if len(self._heap) > 2 * len(self._live) + 64:
            # Revive/free cycles leave stale entries; dropping them keeps memory O(live), amortized O(1).
            self._heap = sorted({(b, p) for b, p in self._heap if p in self._live and self._born.get(p) == b})

    def remove(self, page_id: int) -> None:
        _hashable_id(page_id)
        try:
            self._live.remove(page_id)
        except KeyError:
            raise _missing(page_id) from None

    def pop_victim(self) -> int:
        if not self._live:
            raise _empty()
        while True:
            born, page_id = heapq.heappop(self._heap)
            # skip entries left by remove() and by an earlier eviction of the page (an older age)
            if page_id in self._live and self._born.get(page_id) == born:
                self._live.remove(page_id)
                del self._born[page_id]  # evicted: its contents are gone, its age too
                return page_id

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, page_id: int) -> bool:
        _hashable_id(page_id)
        return page_id in self._live


class Priority:
    """Lowest priority evicted first; LRU within a priority level.

    Priorities are small ints given per sequence when its pages are freed (a
    scheduler passes the request priority). Levels are few, so finding the
    lowest non-empty one is a scan over them.
    """

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[int, None]] = {}
        self._level_of: dict[int, int] = {}

    def add(self, page_id: int, priority: int = 0) -> None:
        page_id, priority = _check_add(self, page_id, priority)
        self._levels.setdefault(priority, OrderedDict())[page_id] = None
        self._level_of[page_id] = priority

    def remove(self, page_id: int) -> None:
        _hashable_id(page_id)
        try:
            level = self._level_of.pop(page_id)
        except KeyError:
            raise _missing(page_id) from None
        del self._levels[level][page_id]
        if not self._levels[level]:
            del self._levels[level]

    def pop_victim(self) -> int:
        if not self._levels:
            raise _empty()
        level = min(self._levels)
        page_id = self._levels[level].popitem(last=False)[0]
        if not self._levels[level]:
            del self._levels[level]
        del self._level_of[page_id]
        return page_id

    def __len__(self) -> int:
        return len(self._level_of)

    def __contains__(self, page_id: int) -> bool:
        _hashable_id(page_id)
        return page_id in self._level_of


POLICIES = {"lru": LRU, "fifo": FIFO, "priority": Priority}


def make_policy(policy: str | EvictionPolicy | None) -> EvictionPolicy:
    """A policy from its name ("lru", "fifo", "priority"), an instance, or None (LRU)."""
    if policy is None:
        return LRU()
    if isinstance(policy, str):
        if policy.lower() not in POLICIES:
            raise ValueError(f"eviction must be one of {sorted(POLICIES)}, got {policy!r}")
        return POLICIES[policy.lower()]()
    if isinstance(policy, type):
        raise TypeError(f"eviction must be a policy instance or name, got the class {policy.__name__} "
                        f"(pass {policy.__name__}())")
    for method in ("add", "remove", "pop_victim", "__len__", "__contains__"):
        if not callable(getattr(policy, method, None)):
            raise TypeError(f"eviction policy {type(policy).__name__} lacks {method}()")
    if len(policy) != 0:
        raise ValueError(f"eviction policy {type(policy).__name__} already holds {len(policy)} pages; "
                         f"a pool needs an empty one of its own")
    return policy
