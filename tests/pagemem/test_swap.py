"""HostSwap: bit-exact round trips, ownership of device pages and host slots, errors that change nothing."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import HostSwap, OutOfHostPages, OutOfPages, PagePool, PoolConfig, SwapTicket
from pagemem.backend import to_host
from pagemem.swap import merge_runs


def make(num_pages: int = 8, num_host_pages: int = 4, device: str = "cpu", page_size: int = 4, **kw):
    pool = PagePool(PoolConfig(num_pages, page_size, 2, 2, 8, "float16", device))
    return pool, HostSwap(pool, num_host_pages, **kw)


def fill_random_bits(pool: PagePool, page_ids, rng) -> dict[int, np.ndarray]:
    """Write random bit patterns (NaNs and denormals included) into pages; return them by page."""
    shape = pool.kv.shape[1:]
    data = {p: rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.float16) for p in page_ids}
    for p, d in data.items():
        pool.kv[p] = pool.xp.asarray(d)
    return data


def assert_bits(pool: PagePool, page_id: int, expected: np.ndarray) -> None:
    got = to_host(pool.kv[page_id])
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def check(pool: PagePool, swap: HostSwap) -> None:
    pool.check_integrity()
    swap.check_integrity()


def snapshot(pool: PagePool, swap: HostSwap):
    return (list(pool._refcount), list(pool._free), swap._host_free.copy().tolist(),
            len(swap._live), len(swap._pending), to_host(pool.kv).copy())


def assert_unchanged(pool: PagePool, swap: HostSwap, before) -> None:
    after = snapshot(pool, swap)
    assert after[:5] == before[:5]
    np.testing.assert_array_equal(after[5].view(np.uint16), before[5].view(np.uint16))
    check(pool, swap)


def test_merge_runs_needs_both_sides_adjacent():
    # device 3,4,5 -> host 0,1,2 is one run; device 9 -> host 3 breaks the device side;
    # device 10 -> host 7 breaks the host side
    assert merge_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 7]) == [(3, 0, 3), (9, 3, 1), (10, 7, 1)]
    assert merge_runs([], []) == []


def test_round_trip_bit_exact_and_ownership():
    """Swapped pages come back bit-exact in new pages; the old ones are freed, host slots released."""
    rng = np.random.default_rng(1)
    pool, swap = make()
    pages = pool.allocate(3)
    data = fill_random_bits(pool, pages, rng)
    ticket = swap.swap_out(pages)
    check(pool, swap)
    assert isinstance(ticket, SwapTicket) and ticket.num_pages == 3 and ticket.is_done()
    assert [pool.refcount(p) for p in pages] == [0, 0, 0]   # CPU copies complete at once
    assert swap.num_free_host_pages == 1
    pool.kv[pages] = 0                                       # the pages are reused meanwhile
    new = swap.swap_in(ticket)
    check(pool, swap)
    assert [pool.refcount(p) for p in new] == [1, 1, 1]
    assert swap.num_free_host_pages == 4 and ticket.state == "in"
    for old, p in zip(pages, new):
        assert_bits(pool, p, data[old])
    assert swap.bandwidth("out") > 0 and swap.bandwidth("in") > 0


def test_swapped_out_cached_page_stays_evictable():
    """A prefix-cached page swapped out goes to the eviction policy, so a later prefix hit can revive it."""
    pool, swap = make()
    [p] = pool.allocate(1)
    pool.cache_page(p, "k")
    swap.swap_out([p])
    assert pool.refcount(p) == 0 and p in pool.policy and pool.lookup("k") == p
    check(pool, swap)


def test_discard_releases_host_slots():
    pool, swap = make()
    ticket = swap.swap_out(pool.allocate(2))
    swap.discard(ticket)
    check(pool, swap)
    assert swap.num_free_host_pages == 4 and pool.num_free_pages == 7


def test_sized_by_bytes():
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = HostSwap(pool, num_bytes=3 * pool.config.page_bytes + 5)
    assert swap.num_host_pages == 3 and swap.host.shape == (3, *pool.config.page_shape)
    with pytest.raises(ValueError, match="exactly one"):
        HostSwap(pool, 3, num_bytes=100)
    with pytest.raises(ValueError, match="num_host_pages"):
        HostSwap(pool, num_bytes=10)
    with pytest.raises(TypeError, match="pool"):
        HostSwap("pool", 3)


@pytest.mark.parametrize("bad, exc, match", [
    ([], ValueError, "empty"),
    ([1, 1], ValueError, "more than once"),
    ([0], ValueError, "NULL_PAGE"),
    ([99], ValueError, "not a valid page"),
    ([5], ValueError, "is free"),
    ([1, 2.0], TypeError, "ints"),
    ("12", TypeError, "sequence"),
    ([1, 2, 3, 1], ValueError, "more than once"),   # a repeat among valid pages at refcount 1
    ([1, 2, 0], ValueError, "NULL_PAGE"),
    ([1, 2, -1], ValueError, "not a valid page"),
    ([1, 2, 8], ValueError, "not a valid page"),
    ([1, 2, 5], ValueError, "is free"),
    ([[1, 2]], TypeError, "ints"),
])
def test_swap_out_bad_pages_change_nothing(bad, exc, match):
    pool, swap = make()
    pool.allocate(3)  # pages 1, 2, 3 in use
    before = snapshot(pool, swap)
    with pytest.raises(exc, match=match):
        swap.swap_out(bad)
    assert_unchanged(pool, swap, before)


def test_swap_out_shared_page_is_refused():
    """Rule: a page another sequence still shares (refcount > 1) stays resident; swap_out refuses it."""
    pool, swap = make()
    pages = pool.allocate(2)
    pool.share([pages[1]])
    before = snapshot(pool, swap)
    with pytest.raises(ValueError, match="shared"):
        swap.swap_out(pages)
    assert_unchanged(pool, swap, before)


def test_host_full_raises_out_of_host_pages_and_changes_nothing():
    pool, swap = make(num_host_pages=2)
    swap.swap_out(pool.allocate(1))
    pages = pool.allocate(2)
    before = snapshot(pool, swap)
    assert not swap.can_swap_out(2) and swap.can_swap_out(1)
    with pytest.raises(OutOfHostPages, match="1 of 2 host pages free"):
        swap.swap_out(pages)
    assert_unchanged(pool, swap, before)


def test_ticket_misuse_changes_nothing():
    pool, swap = make()
    _, other = make()
    ticket = swap.swap_out(pool.allocate(2))
    foreign = other.swap_out(other.pool.allocate(1))
    before = snapshot(pool, swap)
    with pytest.raises(TypeError, match="SwapTicket"):
        swap.swap_in([1, 2])
    with pytest.raises(ValueError, match="another HostSwap"):
        swap.swap_in(foreign)
    assert_unchanged(pool, swap, before)
    swap.swap_in(ticket)
    before = snapshot(pool, swap)
    with pytest.raises(ValueError, match="already used"):
        swap.swap_in(ticket)
    with pytest.raises(ValueError, match="already used"):
        swap.discard(ticket)
    assert_unchanged(pool, swap, before)


def test_swap_in_without_device_pages_raises_out_of_pages():
    pool, swap = make(num_pages=4)
    ticket = swap.swap_out(pool.allocate(2))
    pool.allocate(2)  # 1 page left
    pool.allocate(1)
    before = snapshot(pool, swap)
    with pytest.raises(OutOfPages):
        swap.swap_in(ticket)
    assert_unchanged(pool, swap, before)
    assert ticket.state == "out"


def random_cycles(device: str, steps: int, seed: int, path: str = "auto", make_fn=make) -> None:
    """Seeded random swap out / in / discard interleaved with writes to resident pages."""
    rng = np.random.default_rng(seed)
    # staging of 2 pages (512 B each): the gather path runs in several chunks
    pool, swap = make_fn(num_pages=17, num_host_pages=12, device=device, path=path, staging_bytes=1024)
    resident: dict[int, np.ndarray] = {}            # page_id -> expected bits
    tickets: list[tuple[SwapTicket, list[np.ndarray]]] = []
    for _ in range(steps):
        op = rng.integers(5)
        if op == 0 and pool.can_allocate(1):
            n = int(rng.integers(1, min(4, pool.num_free_pages) + 1))
            resident.update(fill_random_bits(pool, pool.allocate(n), rng))
        elif op == 1 and resident:                  # write other resident pages
            ids = rng.choice(list(resident), size=min(2, len(resident)), replace=False).tolist()
            resident.update(fill_random_bits(pool, ids, rng))
        elif op == 2 and resident:
            ids = rng.permutation(list(resident))[:int(rng.integers(1, 5))].tolist()
            fits = swap.can_swap_out(len(ids))  # copies in flight may complete in between
            try:
                tickets.append((swap.swap_out(ids), [resident.pop(p) for p in ids]))
            except OutOfHostPages:
                assert not fits and all(pool.refcount(p) == 1 for p in ids)
        elif op == 3 and tickets:
            ticket, data = tickets.pop(int(rng.integers(len(tickets))))
            swap.reclaim(wait=bool(rng.integers(2)))
            if pool.can_allocate(ticket.num_pages):
                new = swap.swap_in(ticket)
                for p, d in zip(new, data):         # each swap-in, checked at once: later steps overwrite pages
                    assert_bits(pool, p, d)
                resident.update(zip(new, data))
            else:
                swap.discard(ticket)
        elif op == 4 and resident:
            p = int(rng.choice(list(resident)))
            pool.free([p])
            del resident[p]
        check(pool, swap)
    swap.reclaim(wait=True)
    for p, d in resident.items():
        assert_bits(pool, p, d)
    for ticket, _ in tickets:
        swap.discard(ticket)
    swap.reclaim(wait=True)
    check(pool, swap)
    assert swap.num_free_host_pages == swap.num_host_pages


@pytest.mark.parametrize("path", ["auto", "runs", "gather", "direct"])
def test_random_cycles_bit_exact_cpu(path):
    """Thousands of random swap cycles: every page comes back bit-exact; both pools stay consistent.
    The CPU HostSwap carries out each path's own copy plan (copy_numpy), so each case runs its path."""
    random_cycles("cpu", steps=3000, seed=7, path=path)


def record_plans(monkeypatch) -> list:
    """The plans HostSwap gets from plan_copies from now on, in order."""
    import pagemem.swap as swap_module
    plans, real = [], swap_module.plan_copies

    def recording(*args):
        plans.append(real(*args))
        return plans[-1]
    monkeypatch.setattr(swap_module, "plan_copies", recording)
    return plans


@pytest.mark.parametrize("path", ["auto", "runs", "gather", "direct"])
def test_cpu_swap_takes_the_chosen_paths_plan(path, monkeypatch):
    """Each swap_out and swap_in asks plan_copies for the HostSwap's path and carries out what it
    returns ("auto" resolves to "gather" here) and the bytes follow the plan."""
    plans = record_plans(monkeypatch)
    rng = np.random.default_rng(2)
    pool, swap = make(num_pages=17, num_host_pages=12, path=path, staging_bytes=1024)   # 2-page staging
    pages = pool.allocate(9)
    ids = [pages[i] for i in (4, 0, 5, 6, 7, 1)]             # a run of three and scattered pages
    data = fill_random_bits(pool, ids, rng)
    want = "gather" if path == "auto" else path              # 512-byte pages: runs far below 8 MiB
    ticket = swap.swap_out(ids)
    assert [p.path for p in plans] == [want] and plans[-1].ids.tolist() == ids
    back = swap.swap_in(ticket)
    assert plans[-1].path == want and plans[-1].ids.tolist() == back and len(plans) == 2
    for old, new in zip(ids, back):
        assert_bits(pool, new, data[old])
    check(pool, swap)


def test_a_plan_that_cannot_be_made_changes_nothing(monkeypatch):
    """swap_out plans before it takes host slots or the caller's references: a planning error
    leaves both pools as they were."""
    import pagemem.swap as swap_module

    def broken(*args):
        raise ValueError("no plan")
    pool, swap = make()
    pages = pool.allocate(2)
    before = snapshot(pool, swap)
    monkeypatch.setattr(swap_module, "plan_copies", broken)
    with pytest.raises(ValueError, match="no plan"):
        swap.swap_out(pages)
    assert_unchanged(pool, swap, before)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["runs", "gather", "direct"])
def test_random_cycles_bit_exact_gpu(path):
    """The same on real copy streams, for both copy paths."""
    random_cycles("cuda", steps=600, seed=11, path=path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["runs", "gather", "direct"])
def test_swap_out_after_kernel_reads_new_values(path):
    """A swap-out issued right after a kernel on the compute stream copies what the kernel wrote."""
    import cupy as cp
    pool, swap = make(num_pages=2049, num_host_pages=2048, device="cuda", page_size=16, path=path)
    pages = pool.allocate(2048)
    rng = np.random.default_rng(3)
    ids = rng.permutation(pages)[:1024].tolist()
    compute = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Stream.null.synchronize()  # the pool's zero fill ran on the legacy stream
    with compute:
        pool.kv.fill(0)
        idx = cp.asarray(ids)
        view = pool.kv[idx].astype(cp.float32)
        for _ in range(20):               # a long elementwise kernel queue ends with the write
            view = cp.sin(view) * 0 + 1.5
        pool.kv[idx] = view.astype(pool.kv.dtype)
    ticket = swap.swap_out(ids, stream=compute)
    swap.wait(ticket)
    got = swap.host[ticket.host_slots]
    assert (got == np.float16(1.5)).all()
    new = swap.swap_in(ticket, stream=compute)
    with compute:
        back = pool.kv[cp.asarray(new)].get(stream=compute)
    compute.synchronize()
    assert (back == np.float16(1.5)).all()
    swap.reclaim(wait=True)
    check(pool, swap)


class FakeEvent:
    """A copy still in flight until the test (or a seeded coin) completes it."""

    def __init__(self, coin=None) -> None:
        self._done, self._coin = False, coin

    @property
    def done(self) -> bool:
        if not self._done and self._coin is not None:
            self._done = bool(self._coin())
        return self._done

    def synchronize(self) -> None:
        self._done = True


class InFlightSwap(HostSwap):
    """HostSwap whose copies (the CPU's plan carried out at once) 'complete' only when their
    FakeEvent says so: the CUDA path's ownership logic (lazy reclaim, waits on tickets) on the CPU."""

    def __init__(self, *args, coin=None, **kw) -> None:
        super().__init__(*args, **kw)
        self.coin, self.events = coin, []

    def _copy(self, plan, stream, after, pend) -> None:
        super()._copy(plan, stream, after, pend)
        pend.event = FakeEvent(self.coin)
        self.events.append(pend.event)


def test_pages_in_flight_are_not_handed_out_until_the_copy_completes():
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    a, b, c = pool.allocate(3)
    ticket = swap.swap_out([a, b])
    check(pool, swap)
    # in flight: the ticket still holds a and b (refcount 1); only the 4 never-used pages are free
    assert not ticket.is_done() and pool.refcount(a) == pool.refcount(b) == 1
    assert pool.num_free_pages == 4 and swap.reclaim() == 0
    new = swap.swap_in(ticket)          # before the out copy completed: the in copy waits on it
    assert set(new).isdisjoint({a, b, c}) and swap.num_free_host_pages == 2
    check(pool, swap)
    swap.events[0].synchronize()        # out copy done: a, b go back to the pool
    assert swap.reclaim() == 2 and pool.refcount(a) == 0 and swap.num_free_host_pages == 2
    swap.events[1].synchronize()        # in copy done: the host slots go back
    assert swap.reclaim() == 2 and swap.num_free_host_pages == 4
    check(pool, swap)


def test_discard_in_flight_frees_host_slots_after_the_copy():
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    ticket = swap.swap_out(pool.allocate(3))
    swap.discard(ticket)
    assert swap.num_free_host_pages == 1 and pool.num_free_pages == 4
    swap.reclaim(wait=True)
    assert swap.num_free_host_pages == 4 and pool.num_free_pages == 7
    check(pool, swap)


def test_random_cycles_with_copies_in_flight():
    """Random cycles where each copy completes at a random later poll: nothing is handed out early."""
    coin = np.random.default_rng(5)
    pool_swap = {}

    def make_in_flight(num_pages, num_host_pages, device, path, staging_bytes):
        pool = PagePool(PoolConfig(num_pages, 4, 2, 2, 8, "float16", "cpu"))
        pool_swap["swap"] = InFlightSwap(pool, num_host_pages, coin=lambda: coin.random() < 0.3)
        return pool, pool_swap["swap"]
    random_cycles("cpu", steps=3000, seed=9, make_fn=make_in_flight)


def test_check_integrity_reports_leaked_and_doubled_host_slots():
    pool, swap = make()
    ticket = swap.swap_out(pool.allocate(2))
    swap._host_free[ticket.host_slots[0]] = True         # a held slot marked free
    with pytest.raises(RuntimeError, match=r"both free and held"):
        swap.check_integrity()
    swap._host_free[ticket.host_slots[0]] = False
    swap._host_free[3] = False                            # a slot neither free nor held: leaked
    with pytest.raises(RuntimeError, match=r"free 1 \+ held 2 != 4 host pages"):
        swap.check_integrity()


def test_reclaim_frees_swapped_pages_in_reverse_order():
    """The ticket's pages go back to the free queue tail first, so a sequence's tail is reused first."""
    pool, swap = make()
    pool.allocate(3)                       # 1 2 3; queue: 4 5 6 7
    ticket = swap.swap_out([2, 3, 1])      # CPU copies complete at once: reclaimed in the call
    assert list(pool._free) == [4, 5, 6, 7, 1, 3, 2]
    assert ticket.host_slots == [0, 1, 2] and ticket.slot_array.tolist() == [0, 1, 2]
    check(pool, swap)


@pytest.mark.parametrize("wrap", [tuple, lambda ids: [np.int64(p) for p in ids]], ids=["tuple", "numpy-ints"])
def test_swap_out_accepts_tuples_and_numpy_ints(wrap):
    """Tuples and NumPy ints swap like lists; the pool gets Python ints back."""
    pool, swap = make()
    pages = pool.allocate(3)
    swap.swap_in(swap.swap_out(wrap(pages)))
    assert list(pool._free)[-3:] == pages[::-1] and all(type(p) is int for p in pool._free)
    check(pool, swap)


def test_swap_out_keeps_its_own_copy_of_the_page_ids():
    """A caller reusing its list after swap_out does not change which pages the ticket frees."""
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    a, b, c, d = pool.allocate(4)
    ids = [a, b]
    swap.swap_out(ids)
    ids[:] = [c, d]
    swap.reclaim(wait=True)
    assert [pool.refcount(p) for p in (a, b, c, d)] == [0, 0, 1, 1]
    check(pool, swap)


def test_reclaim_of_pages_freed_behind_the_tickets_back_raises_and_changes_nothing():
    """A caller that frees pages it handed to a ticket gets the pool's double-free error at reclaim."""
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    pages = pool.allocate(2)
    swap.swap_out(pages)
    pool.free([pages[1]])                  # misuse: the ticket owns this reference
    free_before = list(pool._free)
    with pytest.raises(ValueError, match="double free"):
        swap.reclaim(wait=True)
    assert list(pool._free) == free_before and pool.refcount(pages[0]) == 1


def test_swap_out_takes_the_mean_run_rule(monkeypatch):
    """A swap_out's plan: "runs" when merged runs average min_run_bytes, else "gather"; a fixed path wins."""
    plans = record_plans(monkeypatch)
    for path, ids, want in (("auto", [1, 2, 3, 4], "runs"),      # one run of 2048 bytes
                            ("auto", [1, 2, 3, 9], "gather"),    # runs of 1536 and 512 bytes
                            ("direct", [1, 2, 3, 4], "direct"), ("runs", [1, 9], "runs")):
        pool, swap = make(num_pages=17, num_host_pages=12, min_run_bytes=4 * 512, path=path)   # 512-byte pages
        pool.allocate(16)
        swap.swap_out(ids)                                      # host slots 0, 1, ...
        assert plans[-1].path == want
