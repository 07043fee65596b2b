"""PagePool: the page-major K/V device array and who owns each page.

Every page is in exactly one of three states:

    clean free  refcount 0, no cached contents      -> in ``_free`` (a deque, least recently freed first)
    evictable   refcount 0, contents still cached   -> in the eviction policy
    used        refcount >= 1                        -> owned by that many page tables

NULL_PAGE (0) is in none of them: it is never handed out and only pads page tables.
``allocate`` takes clean pages first (front of the queue: least recently freed) and
evicts a cached page only when none is left, so cached prefixes live as long as possible.
"""
from __future__ import annotations

import contextlib
from collections import Counter, deque
from itertools import repeat, starmap
from operator import itemgetter
from typing import Hashable, Iterable, NamedTuple, Sequence

import numpy as np

from pagemem.backend import array_module, resolve_device
from pagemem.config import PoolConfig, check_int
from pagemem.eviction import EvictionPolicy, make_policy

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """allocate() asked for more pages than are free (check can_allocate first)."""


class PoolStats(NamedTuple):
    num_pages: int           # usable pages (NULL_PAGE excluded)
    num_free: int            # clean free pages
    num_cached: int          # evictable: refcount 0 but contents still in the prefix cache
    num_used: int            # refcount >= 1
    utilization: float       # num_used / num_pages
    fragmentation: float     # unused token slots in the given sequences' last pages / their slots


class PagePool:
    """Fixed-size pages of K/V for every layer, with refcounts, a free queue and a prefix-cache index.

    ``kv``: [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim], NumPy or CuPy.
    Bookkeeping is plain Python ints on the host; only ``kv`` lives on the device.
    Every method validates its whole input before changing anything, so a call that
    raises leaves the pool exactly as it was.
    """

    def __init__(self, config: PoolConfig, eviction: str | EvictionPolicy | None = None) -> None:
        if not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a PoolConfig, got {type(config).__name__}")
        self.config = config
        self.device = resolve_device(config.device)
        self.xp = array_module(self.device)
        self.page_size = config.page_size
        self.num_pages = config.num_pages
        # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
        self.kv = self.xp.zeros((config.num_pages, *config.page_shape), dtype=config.np_dtype)
        self._refcount = [0] * config.num_pages
        self.refcounts: Sequence[int] = self._refcount   # the same list, for others to read: only the pool writes
        # Why a deque: pop-front and append are O(1) C calls, and a batch moves in one C loop
        # (extend, starmap(popleft)). A clean page never leaves from the middle of the queue
        # (evictable pages live in the policy), so no keyed removal is needed.
        self._free: deque[int] = deque(range(1, config.num_pages))
        self.policy = make_policy(eviction)
        self._key_of: dict[int, Hashable] = {}   # page_id -> prefix-cache key (used or evictable)
        self._page_of: dict[Hashable, int] = {}  # prefix-cache key -> page_id
        self.num_evictions = 0

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages allocate() can hand out now: clean free plus evictable."""
        return len(self._free) + len(self.policy)

    def can_allocate(self, num_pages: int) -> bool:
        """Whether allocate(num_pages) would succeed now (num_pages >= 0; 0 is always True)."""
        if type(num_pages) is not int or num_pages < 0:
            num_pages = check_int(num_pages, "num_pages", 0)
        return num_pages <= len(self._free) + len(self.policy)

    def refcount(self, page_id: int) -> int:
        self.check_page_ids([page_id], "page_id")
        return self._refcount[page_id]

    def layer_kv(self, layer: int):
        """Views ``k, v: [num_pages, page_size, num_kv_heads, head_dim]`` of one layer (strided over pages)."""
        layer = check_int(layer, "layer", 0, self.config.num_layers - 1)
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    # ---- allocate / free / share ---------------------------------------------------------------
    def allocate(self, num_pages: int) -> list[int]:
        """Take ``num_pages`` pages (refcount 1 each, owned by the caller). Clean pages first,
        then victims of the eviction policy, whose cached contents are dropped.
        Raises OutOfPages, changing nothing, when fewer are free."""
        if type(num_pages) is not int or num_pages < 1:
            num_pages = check_int(num_pages, "num_pages", 1)
        free = self._free
        if num_pages > len(free) + len(self.policy):
            raise OutOfPages(
                f"asked for {num_pages} pages, {len(free)} free and {len(self.policy)} evictable "
                f"of {self.num_pages - 1}"
            )
        rc = self._refcount
        if num_pages == 1 and free:
            p = free.popleft()
            rc[p] = 1
            return [p]
        if num_pages <= len(free):
            pages = list(starmap(free.popleft, repeat((), num_pages)))
        else:
            # Victims first: if a (user-written) policy raises, no clean page has been taken yet.
            victims = [self._evict_one() for _ in range(num_pages - len(free))]
            pages = list(free) + victims
            free.clear()
        for p in pages:
            rc[p] = 1
        return pages

    def free(self, page_ids: Sequence[int], priority: int = 0) -> None:
        """Drop one reference to each page. A page reaching refcount 0 joins the back of the
        free queue (clean) or the eviction policy (cached, with ``priority``), in the order
        given: free a sequence's pages in reverse so its tail is reused or evicted first."""
        if type(page_ids) is list and type(priority) is int and page_ids and self.are_private(page_ids):
            self._release_private(page_ids, priority)  # the common case, checked in C-level passes
            return
        rc = self._refcount
        self.check_page_ids(page_ids, "page_ids")
        priority = check_int(priority, "priority")
        if len(page_ids) == 1:
            if rc[page_ids[0]] < 1:
                raise ValueError(f"double free: page {page_ids[0]} is already free")
        else:
            for p, n in Counter(page_ids).items():
                if rc[p] < n:
                    raise ValueError(f"double free: page {p} has refcount {rc[p]}, freed {n} time(s)")
        cached, free = self._key_of, self._free
        for p in page_ids:
            p = int(p)
            rc[p] -= 1
            if rc[p] == 0:
                if p in cached:
                    self.policy.add(p, priority)
                else:
                    free.append(p)

    def free_prechecked(self, page_ids: list[int], priority: int = 0) -> None:
        """free() of a list of distinct valid int ids the caller checked when it took them
        (HostSwap's in-flight pages): only the refcounts are checked again; anything unusual
        goes through free(), which raises the precise error."""
        if type(priority) is int and self._at_refcount_one(page_ids):
            self._release_private(page_ids, priority)
        else:
            self.free(page_ids, priority)

    def _release_private(self, page_ids: list[int], priority: int) -> None:
        """free() of distinct valid pages at refcount 1, already checked; C loops where none is cached."""
        rc, cached = self._refcount, self._key_of
        if not cached or cached.keys().isdisjoint(page_ids):
            for p in page_ids:
                rc[p] = 0
            self._free.extend(page_ids)
            return
        for p in page_ids:  # some are cached: each joins its queue, in the order given
            rc[p] = 0
            if p in cached:
                self.policy.add(p, priority)
            else:
                self._free.append(p)

    def share(self, page_ids: Sequence[int]) -> None:
        """Add one reference to each page, which must be in use (e.g. a forked sequence)."""
        self.check_page_ids(page_ids, "page_ids")
        rc = self._refcount
        for p in page_ids:
            if rc[p] == 0:
                raise ValueError(f"share: page {p} is free; only pages in use can be shared")
        for p in page_ids:
            rc[p] += 1

    def touch(self, page_ids: Sequence[int]) -> None:
        """Add one reference to each cached page, reviving it from the eviction policy if its
        refcount was 0 (a prefix-cache hit). A clean free page cannot be touched: its data is garbage."""
        self.check_page_ids(page_ids, "page_ids")
        rc = self._refcount
        for p in page_ids:
            if rc[p] == 0 and p not in self._key_of:
                raise ValueError(f"touch: page {p} is free and not cached")
        for p in page_ids:
            if rc[p] == 0:
                self.policy.remove(p)
            rc[p] += 1

    # ---- prefix-cache index ----------------------------------------------------------------------
    def cache_page(self, page_id: int, key: Hashable) -> bool:
        """Index a used, full page under ``key`` (any hashable). Returns False (and changes nothing)
        when the key already names another page or this page already has a key."""
        self.check_page_ids([page_id], "page_id")
        _check_key(key)
        if self._refcount[page_id] == 0:
            raise ValueError(f"cache_page: page {page_id} is free")
        if key in self._page_of or page_id in self._key_of:
            return False
        self._key_of[page_id] = key
        self._page_of[key] = page_id
        return True

    def lookup(self, key: Hashable) -> int | None:
        """The page cached under ``key``, used or evictable, or None. Changes nothing."""
        _check_key(key)
        return self._page_of.get(key)

    def is_cached(self, page_id: int) -> bool:
        """Whether a page id of this pool has a prefix-cache key. Changes nothing."""
        self.check_page_ids([page_id], "page_id")
        return page_id in self._key_of

    def cache_key(self, page_id: int) -> Hashable:
        """The page's prefix-cache key, or None when it has none (is_cached tells that from a None key)."""
        self.check_page_ids([page_id], "page_id")
        return self._key_of.get(page_id)

    def _evict_one(self) -> int:
        page_id = self.policy.pop_victim()
        del self._page_of[self._key_of.pop(page_id)]
        self.num_evictions += 1
        return page_id

    # ---- data --------------------------------------------------------------------------------
    def copy_page(self, src: int, dst: int, stream=None) -> None:
        """Copy every layer's K/V of page ``src`` into ``dst`` (copy-on-write), on ``stream``.
        Both pages must be in use and ``dst`` owned by the caller alone (refcount 1)."""
        self.check_page_ids([src, dst], "page_ids")
        if self._refcount[src] < 1 or self._refcount[dst] != 1 or dst in self._key_of:
            raise ValueError(f"copy_page: src {src} must be in use (refcount {self._refcount[src]}) and dst {dst} "
                             f"private and uncached (refcount {self._refcount[dst]})")
        if self.device == "cuda":
            with stream if stream is not None else contextlib.nullcontext():
                self.kv[dst] = self.kv[src]
        else:
            self.kv[dst] = self.kv[src]

    # ---- checks ----------------------------------------------------------------------------------
    def are_private(self, page_ids: Sequence[int]) -> bool:
        """Whether ``page_ids`` (not empty) are distinct valid page ids held by one reference each,
        as Python ints. Checked in C-level passes (~60 ns a page); on False a caller takes its
        general path, which raises the precise error or handles shared pages. Changes nothing."""
        n = len(page_ids)
        if n == 1:
            p = page_ids[0]
            return type(p) is int and 0 < p < self.num_pages and self._refcount[p] == 1
        try:
            return (list(map(type, page_ids)).count(int) == n and min(page_ids) > 0
                    and self._at_refcount_one(page_ids) and len(set(page_ids)) == n)
        except IndexError:  # a page id >= num_pages
            return False

    def _at_refcount_one(self, page_ids: Sequence[int]) -> bool:
        """Whether each of ``page_ids`` (not empty, ints >= 0) has refcount 1."""
        rc = self._refcount
        return (itemgetter(*page_ids)(rc) if len(page_ids) > 1 else (rc[page_ids[0]],)).count(1) == len(page_ids)

    def check_page_ids(self, page_ids: Sequence[int], name: str) -> None:
        """TypeError unless ``page_ids`` is a sequence (or 1-d array) of ints; ValueError naming the
        first id outside [1, num_pages)."""
        if type(page_ids) is not list and (isinstance(page_ids, (str, bytes)) or not isinstance(
                page_ids, (Sequence, np.ndarray))):
            raise TypeError(f"{name} must be a sequence of ints, got {type(page_ids).__name__}")
        n = self.num_pages
        for p in page_ids:
            if type(p) is int and 0 < p < n:  # the common case, kept cheap
                continue
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"{name} must hold ints, got {type(p).__name__}")
            if not 0 < p < n:
                what = "NULL_PAGE (0)" if p == NULL_PAGE else f"{p}, outside [1, {n})"
                raise ValueError(f"{name}: page id {what} is not a valid page")

    def check_integrity(self) -> None:
        """Raise RuntimeError, with the counts, if any bookkeeping invariant is broken."""
        rc = self._refcount
        n = self.num_pages
        free, evictable = set(self._free), {p for p in range(1, n) if p in self.policy}
        used = {p for p in range(1, n) if rc[p] > 0}
        problems = []
        if rc[NULL_PAGE] != 0 or NULL_PAGE in free or NULL_PAGE in evictable or NULL_PAGE in self._key_of:
            problems.append("NULL_PAGE is referenced, free or cached")
        if len(free) != len(self._free) or len(evictable) != len(self.policy):
            problems.append(f"queue sizes: free {len(self._free)} vs {len(free)} distinct, "
                            f"evictable {len(self.policy)} vs {len(evictable)} found")
        if any(r < 0 for r in rc):
            problems.append(f"negative refcounts at {[p for p in range(n) if rc[p] < 0]}")
        if free & evictable or free & used or evictable & used:
            problems.append(f"pages in two states: {sorted((free & evictable) | (free & used) | (evictable & used))}")
        if len(free) + len(evictable) + len(used) != n - 1:
            problems.append(f"free {len(free)} + evictable {len(evictable)} + used {len(used)} != {n - 1} pages")
        if any(p in self._key_of for p in free) or any(p not in self._key_of for p in evictable):
            problems.append("a clean free page has a cache key, or an evictable page has none")
        if any(self._page_of.get(k) != p for p, k in self._key_of.items()) or len(self._page_of) != len(self._key_of):
            problems.append(f"cache index mismatch: {len(self._key_of)} keys by page, {len(self._page_of)} pages by key")
        if problems:
            raise RuntimeError("PagePool integrity: " + "; ".join(problems))

    def stats(self, seqs: Iterable = ()) -> PoolStats:
        """Counts by state; ``fragmentation`` over the given sequences (objects with
        ``num_tokens`` and ``page_table``, e.g. SeqPages) is the share of their slots left empty."""
        usable = self.num_pages - 1
        num_free, num_cached = len(self._free), len(self.policy)
        num_used = usable - num_free - num_cached
        slots = tokens = 0
        for s in _as_seqs(seqs):
            slots += len(s.page_table) * self.page_size
            tokens += s.num_tokens
        frag = (slots - tokens) / slots if slots else 0.0
        return PoolStats(usable, num_free, num_cached, num_used, num_used / usable, frag)



def _check_key(key) -> None:
    """TypeError naming ``key`` when it cannot index the prefix cache (unhashable)."""
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"key must be hashable, got {type(key).__name__}") from None


def _as_seqs(seqs) -> list:
    """``seqs`` as a list of objects with ``page_table`` and an int ``num_tokens``, else TypeError."""
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
        raise TypeError(f"seqs must be an iterable of sequences (SeqPages), got {type(seqs).__name__}")
    seqs = list(seqs)
    for s in seqs:
        if not (hasattr(s, "page_table") and type(getattr(s, "num_tokens", None)) is int):
            raise TypeError(f"seqs must hold objects with page_table and num_tokens (SeqPages), "
                            f"got {type(s).__name__}")
    return seqs
