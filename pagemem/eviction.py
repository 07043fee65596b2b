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

and optionally ``forget(page_id)``: the page's cached contents were dropped, so any age the
policy keeps for it (FIFO) starts over.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Protocol


class EvictionPolicy(Protocol):
    def add(self, page_id: int, priority: int = 0) -> None: ...
    def remove(self, page_id: int) -> None: ...
    def pop_victim(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, page_id: int) -> bool: ...


class LRU:
    """Least recently freed first. An OrderedDict is a C doubly linked list: O(1) everywhere."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, page_id: int, priority: int = 0) -> None:
        self._order[page_id] = None

    def remove(self, page_id: int) -> None:
        del self._order[page_id]

    def pop_victim(self) -> int:
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, page_id: int) -> bool:
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
        born = self._born.setdefault(page_id, next(self._clock))
        self._live.add(page_id)
        heapq.heappush(self._heap, (born, page_id))
        if len(self._heap) > 2 * len(self._live) + 64:
            # Revive/free cycles leave stale entries; dropping them keeps memory O(live), amortized O(1).
            self._heap = sorted({(b, p) for b, p in self._heap if p in self._live and self._born.get(p) == b})

    def remove(self, page_id: int) -> None:
        self._live.remove(page_id)

    def pop_victim(self) -> int:
        while True:
            born, page_id = heapq.heappop(self._heap)
            # skip entries left by remove() and by an age reset (forget, then add again)
            if page_id in self._live and self._born.get(page_id) == born:
                self._live.remove(page_id)
                del self._born[page_id]  # evicted: its contents are gone, its age too
                return page_id

    def forget(self, page_id: int) -> None:
        """The page's cached contents were dropped (overwritten); reset its age."""
        self._born.pop(page_id, None)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, page_id: int) -> bool:
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
        self._levels.setdefault(priority, OrderedDict())[page_id] = None
        self._level_of[page_id] = priority

    def remove(self, page_id: int) -> None:
        level = self._level_of.pop(page_id)
        del self._levels[level][page_id]
        if not self._levels[level]:
            del self._levels[level]

    def pop_victim(self) -> int:
        level = min(self._levels)
        page_id = self._levels[level].popitem(last=False)[0]
        if not self._levels[level]:
            del self._levels[level]
        del self._level_of[page_id]
        return page_id

    def __len__(self) -> int:
        return len(self._level_of)

    def __contains__(self, page_id: int) -> bool:
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
    for method in ("add", "remove", "pop_victim", "__len__", "__contains__"):
        if not callable(getattr(policy, method, None)):
            raise TypeError(f"eviction policy {type(policy).__name__} lacks {method}()")
    return policy
