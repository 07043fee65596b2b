"""A hypothesis state machine drives the pool and page tables through thousands of steps and
checks them against a plain model of who owns which page, which token each sequence holds, and
what each prefix-cached page contains, under each eviction policy."""
from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from hypothesis_budget import scaled

from pagemem import OutOfPages, PagePool, PoolConfig, SeqPages, pack_batch

PAGE_SIZE = 4


class PoolMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    eviction = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(PoolConfig(9, PAGE_SIZE, 1, 1, 1, "float32", "cpu"), self.eviction)
        self.cached: dict[tuple, list[float]] = {}  # model: cache key -> the page's token values
        self.tokens: dict[int, list[float]] = {}   # model: id(seq) -> marker value of each token
        self.next_value = 1.0
        self.raw: list[int] = []                   # pages held by allocate() directly
        self.live: dict[int, SeqPages] = {}

    # ---- helpers ----------------------------------------------------------------------
    def _write(self, slots: np.ndarray) -> list[float]:
        values = [self.next_value + i for i in range(len(slots))]
        self.next_value += len(slots)
        k, _ = self.pool.layer_kv(0)
        k[slots // PAGE_SIZE, slots % PAGE_SIZE, 0, 0] = values
        return values

    def _read(self, seq: SeqPages) -> list[float]:
        k, _ = self.pool.layer_kv(0)
        slots = seq.slots(0, seq.num_tokens)
        return k[slots // PAGE_SIZE, slots % PAGE_SIZE, 0, 0].tolist()

    # ---- rules ------------------------------------------------------------------------
    @rule(target=seqs, n=st.integers(0, 12))
    def new_seq(self, n):
        seq = SeqPages(self.pool)
        self.tokens[id(seq)] = []
        self.live[id(seq)] = seq
        self._append(seq, n)
        return seq

    @rule(seq=seqs, n=st.integers(0, 9))
    def append(self, seq, n):
        self._append(seq, n)

    def _append(self, seq, n):
        before = (list(seq.page_table), seq.num_tokens, self.pool.num_free_pages)
        if seq.can_append(n):
            self.tokens[id(seq)] += self._write(seq.append(n))
        else:
            try:
                seq.append(n)
                raise AssertionError("append succeeded although can_append said no")
            except OutOfPages:
                assert (seq.page_table, seq.num_tokens, self.pool.num_free_pages) == before

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        child = seq.fork()
        self.tokens[id(child)] = list(self.tokens[id(seq)])
        self.live[id(child)] = child
        return child

    @rule(seq=consumes(seqs), priority=st.integers(0, 2))
    def free_seq(self, seq, priority):
        seq.free(priority)
        del self.tokens[id(seq)], self.live[id(seq)]

    @rule(seq=seqs, data=st.data())
    def cache_full_page(self, seq, data):
        full = seq.num_tokens // PAGE_SIZE
        if not full:
            return
        page = seq.page_table[data.draw(st.integers(0, full - 1))]
        key = ("page", len(self.cached), page)
        if self.pool.cache_page(page, key):
            self.cached[key] = self._page_values(page)

    @rule(data=st.data())
    def revive_cached(self, data):
        evictable = sorted(k for k in self.cached if (p := self.pool.lookup(k)) is not None
                           and self.pool._refcount[p] == 0)
        if evictable:
            page = self.pool.lookup(data.draw(st.sampled_from(evictable)))
            self.pool.touch([page])
            self.raw.append(page)

    def _page_values(self, page: int) -> list[float]:
        k, _ = self.pool.layer_kv(0)
        return k[page, :, 0, 0].tolist()

    @rule(n=st.integers(1, 4))
    def allocate_raw(self, n):
        if self.pool.can_allocate(n):
            self.raw += self.pool.allocate(n)

    @rule(data=st.data(), priority=st.integers(0, 2))
    def free_raw(self, data, priority):
        if self.raw:
            i = data.draw(st.integers(0, len(self.raw) - 1))
            self.pool.free([self.raw.pop(i)], priority)

    @rule(seq=seqs)
    def share_and_release(self, seq):
        if seq.page_table:
            self.pool.share(seq.page_table)
            self.pool.free(seq.page_table)

    @rule(data=st.data())
    def pack(self, data):
        live = [s for s in self._live() if s.num_tokens > 0]
        if not live:
            return
        q = [data.draw(st.integers(1, s.num_tokens)) for s in live]
        batch = pack_batch(live, q)
        for i, s in enumerate(live):
            lo, hi = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            np.testing.assert_array_equal(batch.slot_mapping[lo:hi], s.slots(s.num_tokens - q[i], s.num_tokens))
            assert batch.page_tables[i, :len(s.page_table)].tolist() == s.page_table

    def _live(self) -> list[SeqPages]:
        return list(self.live.values())

    # ---- invariants -------------------------------------------------------------------
    @invariant()
    def integrity(self):
        self.pool.check_integrity()

    @invariant()
    def refcounts_match_owners(self):
        owners = Counter(p for s in self._live() for p in s.page_table) + Counter(self.raw)
        for p in range(1, self.pool.num_pages):
            assert self.pool._refcount[p] == owners[p], f"page {p}: refcount {self.pool._refcount[p]}, owners {owners[p]}"

    @invariant()
    def cached_pages_keep_their_contents(self):
        for key, values in list(self.cached.items()):
            page = self.pool.lookup(key)
            if page is None:                      # evicted: its contents may be reused now
                del self.cached[key]
            else:
                assert self._page_values(page) == values, f"cached page {page} changed"

    @invariant()
    def tokens_are_private(self):
        for s in self._live():
            assert self._read(s) == self.tokens[id(s)]

    def teardown(self):
        for s in self._live():
            s.free()
        self.pool.free(self.raw)
        self.pool.check_integrity()
        assert self.pool.num_free_pages == self.pool.num_pages - 1, "pages leaked"


class FIFOPoolMachine(PoolMachine):
    eviction = "fifo"


class PriorityPoolMachine(PoolMachine):
    eviction = "priority"


_SETTINGS = settings(max_examples=scaled(100), stateful_step_count=60, deadline=None)
PoolMachine.TestCase.settings = FIFOPoolMachine.TestCase.settings = PriorityPoolMachine.TestCase.settings = _SETTINGS
TestPoolMachine = PoolMachine.TestCase
TestFIFOPoolMachine = FIFOPoolMachine.TestCase
TestPriorityPoolMachine = PriorityPoolMachine.TestCase
