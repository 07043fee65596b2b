"""HostSwap's deferred calls: a step's swap-outs (and swap-ins) planned and copied as one call by
``flush``; bytes bit-exact, each ticket gets exactly its own pages back, nothing changes on a
failed call; the counters of calls, copy time and host waits."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from test_swap import InFlightSwap, assert_bits, assert_unchanged, check, fill_random_bits, make, snapshot
from test_swap_copy import DevArray, FakeCupy

from pagemem import OutOfHostPages, OutOfPages, PagePool, PoolConfig
from pagemem._swap_copy import D2H


def deferred_out(swap, groups, priority=0):
    """Deferred swap-outs of each group of pages; returns their tickets."""
    return [swap.swap_out(g, priority=priority, defer=True) for g in groups]


def test_deferred_swap_outs_are_one_call_and_free_their_pages_at_once():
    """Three deferred swap-outs take their host slots and give their pages back (tail first) at
    once; flush copies all of them as one call, after which each ticket's host copy holds its bytes."""
    rng = np.random.default_rng(0)
    pool, swap = make(num_pages=17, num_host_pages=12)
    pages = pool.allocate(9)
    data = fill_random_bits(pool, pages, rng)
    groups = [pages[0:3], pages[5:7], pages[3:5] + pages[7:9]]
    tickets = deferred_out(swap, groups)
    check(pool, swap)
    assert swap.num_calls == {"out": 0, "in": 0} and swap.has_deferred
    assert all(pool.refcount(p) == 0 for p in pages) and list(pool._free)[-4:] == groups[2][::-1]
    assert swap.num_free_host_pages == 3 and not any(t.is_done() for t in tickets)
    assert swap.flush() == 9
    assert swap.num_calls == {"out": 1, "in": 0} and not swap.has_deferred
    for t, g in zip(tickets, groups):
        assert t.is_done()
        for slot, p in zip(t.host_slots, g):
            np.testing.assert_array_equal(swap.host[slot].view(np.uint16), data[p].view(np.uint16))
    assert swap.flush() == 0 and swap.num_calls["out"] == 1      # nothing deferred: no call
    check(pool, swap)


def test_batched_swap_ins_give_each_ticket_exactly_its_own_pages():
    """Tickets swapped in together (in another order than they went out, one of them not deferred)
    each get their own bytes back in their own new pages; one call carries the deferred ones."""
    rng = np.random.default_rng(1)
    pool, swap = make(num_pages=17, num_host_pages=12)
    pages = pool.allocate(10)
    data = fill_random_bits(pool, pages, rng)
    groups = [pages[0:4], [pages[9]], pages[4:6], pages[6:9]]
    tickets = deferred_out(swap, groups)
    swap.flush()
    pool.allocate(pool.num_free_pages - 10)         # the pages the groups had are taken by others
    order = [2, 0, 3]
    back = {i: swap.swap_in(tickets[i], defer=True) for i in order}
    assert swap.num_calls["in"] == 0 and swap.num_free_host_pages == 2    # slots held until the copy
    alone = swap.swap_in(tickets[1])                 # not deferred: flushes the others first
    assert swap.num_calls["in"] == 2
    back[1] = alone
    for i, g in enumerate(groups):
        assert len(back[i]) == len(g)
        for new, old in zip(back[i], g):
            assert_bits(pool, new, data[old])
    assert swap.num_free_host_pages == 12
    check(pool, swap)


def test_flush_copies_before_the_freed_pages_are_written_again():
    """Deferred swap-outs' pages handed out to another owner and written after the flush: the
    host copies keep the old bytes, and a swap-in gives them back."""
    rng = np.random.default_rng(2)
    pool, swap = make(num_pages=9, num_host_pages=8)
    pages = pool.allocate(8)
    data = fill_random_bits(pool, pages, rng)
    tickets = deferred_out(swap, [pages[:5], pages[5:]])
    reused = pool.allocate(8)                        # every page again, nothing written yet
    assert sorted(reused) == sorted(pages)
    swap.flush()
    fill_random_bits(pool, reused, rng)              # the new owner's writes come after the flush
    pool.free(reused[:5])
    for t, g in zip(tickets[:1], [pages[:5]]):
        for new, old in zip(swap.swap_in(t), g):
            assert_bits(pool, new, data[old])
    check(pool, swap)


def test_discarding_a_deferred_ticket_frees_its_slots_and_leaves_the_others():
    rng = np.random.default_rng(3)
    pool, swap = make(num_pages=17, num_host_pages=12)
    pages = pool.allocate(6)
    data = fill_random_bits(pool, pages, rng)
    a, b = deferred_out(swap, [pages[:3], pages[3:]])
    swap.discard(a)
    assert swap.num_free_host_pages == 9 and a.state == "discarded"
    check(pool, swap)
    swap.flush()
    for new, old in zip(swap.swap_in(b), pages[3:]):
        assert_bits(pool, new, data[old])
    assert swap.num_free_host_pages == 12
    check(pool, swap)


@pytest.mark.parametrize("call, exc", [
    (lambda swap, pages: swap.swap_out(pages, defer=True), OutOfHostPages),     # 4 pages, 3 slots free
    (lambda swap, pages: swap.swap_out(pages[:1], defer="yes"), TypeError),
    (lambda swap, pages: swap.swap_out(pages[:1] * 2, defer=True), ValueError),
])
def test_a_failed_deferred_swap_out_changes_nothing(call, exc):
    pool, swap = make(num_pages=9, num_host_pages=4)
    pages = pool.allocate(5)
    deferred_out(swap, [pages[4:]])                  # one deferred call already waits for a flush
    before = snapshot(pool, swap)
    staged = list(swap._staged_out)
    with pytest.raises(exc):
        call(swap, pages[:4])
    assert_unchanged(pool, swap, before)
    assert swap._staged_out == staged


def test_a_failed_deferred_swap_in_and_a_failed_flush_change_nothing(monkeypatch):
    import pagemem.swap as swap_module
    pool, swap = make(num_pages=9, num_host_pages=8)
    pages = pool.allocate(6)
    (ticket,) = deferred_out(swap, [pages[:4]])
    pool.allocate(pool.num_free_pages - 2)           # 2 free pages: too few for the ticket's 4
    before, staged = snapshot(pool, swap), list(swap._staged_out)
    with pytest.raises(OutOfPages):
        swap.swap_in(ticket, defer=True)
    with pytest.raises(TypeError, match="defer"):
        swap.swap_in(ticket, defer=1)

    def broken(*args):
        raise ValueError("no plan")
    monkeypatch.setattr(swap_module, "plan_copies", broken)
    with pytest.raises(ValueError, match="no plan"):
        swap.flush()
    assert_unchanged(pool, swap, before)
    assert swap._staged_out == staged and ticket.staged and ticket.state == "out"


def test_wait_on_a_deferred_ticket_flushes_it():
    rng = np.random.default_rng(4)
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    pages = pool.allocate(3)
    data = fill_random_bits(pool, pages, rng)
    ticket = swap.swap_out(pages, defer=True)
    assert ticket.event is None and not ticket.is_done()
    swap.wait(ticket)                                # queues the copy, then waits on its event
    assert ticket.is_done() and swap.num_calls["out"] == 1
    for new, old in zip(swap.swap_in(ticket), pages):
        assert_bits(pool, new, data[old])
    swap.reclaim(wait=True)
    check(pool, swap)


def test_wait_seconds_count_only_blocking_waits(monkeypatch):
    """wait_s adds the host clock around each blocking wait (wait, reclaim(wait=True)) and nothing
    for a poll; here the clock is a stand-in advancing 0.25 s a reading."""
    import pagemem.swap as swap_module
    clock = iter(np.arange(0, 1000, 0.25).tolist())
    monkeypatch.setattr(swap_module.time, "perf_counter", lambda: next(clock))
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    swap = InFlightSwap(pool, 4)
    a = swap.swap_out(pool.allocate(2))               # CPU copy timed: two readings
    swap.reclaim()                                    # a poll: no wait
    assert swap.wait_s == 0.0
    swap.wait(a)                                      # one blocking wait: two readings, 0.25 s apart
    assert swap.wait_s == 0.25
    b = swap.swap_out(pool.allocate(1))
    swap.swap_in(b)
    swap.reclaim(wait=True)                           # two pending copies: two waits
    assert swap.wait_s == 0.75
    check(pool, swap)


def test_copy_seconds_and_calls_add_up(monkeypatch):
    """copy_s sums the measured time of completed copies by direction (CPU: the NumPy copies, here
    timed by a stand-in clock of 1 s a reading pair); num_calls counts each call or flush."""
    import pagemem.swap as swap_module
    clock = iter(range(10_000))
    monkeypatch.setattr(swap_module.time, "perf_counter", lambda: next(clock))
    pool, swap = make(num_pages=17, num_host_pages=12)
    ts = deferred_out(swap, [pool.allocate(2), pool.allocate(3)])
    swap.flush()
    swap.swap_in(ts[0])
    swap.swap_in(ts[1], defer=True)
    swap.flush()
    assert swap.num_calls == {"out": 1, "in": 2} and swap.copy_s == {"out": 1.0, "in": 2.0}


# ---- the CUDA branch against the stand-in for CuPy (tests/pagemem/test_swap_copy.py) ------------
def _cuda_swap(monkeypatch, copy_kernel=None, num_pages=33, num_host_pages=24):
    cp = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    pool = PagePool(PoolConfig(num_pages, 4, 2, 2, 8, "float16", "cpu"))
    pool.kv, pool.device = pool.kv.view(DevArray), "cuda"     # this pool's pages pose as device memory
    from pagemem import HostSwap
    return cp, pool, HostSwap(pool, num_host_pages, copy_kernel=copy_kernel, staging_bytes=4 * 512)


def rows_kernel(log):
    """A stand-in for pagemem.kernels.swap_copy.copy_pages: memmoves of whole pages, rows read
    from the pointers it is given (the pinned id buffer), 0 meaning the identity."""
    import ctypes

    def copy_pages(src, dst, src_rows, dst_rows, n, page_bytes, stream):
        log.append(("kernel", n))
        rows = lambda ptr: (np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int64)), (n,)).tolist()  # noqa: E731
                            if ptr else list(range(n)))
        for s, d in zip(rows(src_rows), rows(dst_rows)):
            ctypes.memmove(dst + d * page_bytes, src + s * page_bytes, page_bytes)
    return copy_pages


@pytest.mark.parametrize("kernel", [False, True], ids=["cupy-take", "copy-kernel"])
def test_cuda_flush_is_one_burst_a_direction_and_the_compute_stream_waits(monkeypatch, kernel):
    """On the CUDA branch a flush of three deferred swap-outs is one enqueue: one ready record, one
    start and one end, and the compute stream waits on it (the pages were handed out already).
    With a copy kernel the ids are not uploaded (no H2D memcpy before a D2H) and no take runs; the
    staging (4 pages) takes 3 chunks for 9 pages. Bytes come back bit-exact; warm calls create no
    event and allocate no pinned memory."""
    klog = []
    cp, pool, swap = _cuda_swap(monkeypatch, rows_kernel(klog) if kernel else None)
    rng = np.random.default_rng(5)
    compute = cp.cuda.Stream()
    for round_ in range(2):
        pages = pool.allocate(9)
        data = fill_random_bits(pool, pages, rng)
        tickets = [swap.swap_out(g, compute, defer=True) for g in (pages[:2], pages[2:7], pages[7:])]
        cp.log.clear()
        klog.clear()
        swap.flush(compute)
        own = [c for c in cp.log if c.startswith("record ") and c != f"record {compute.ptr}"]  # the out stream's
        assert len(own) == 2 and own[0] == own[1] and cp.log[-1] == f"wait {compute.ptr}", cp.log
        out = swap._copiers[D2H].stream.ptr
        assert (f"take @{out}" in cp.log) == (not kernel) and (f"memcpy 1 @{out}" in cp.log) == (not kernel)
        assert klog == ([("kernel", 4), ("kernel", 4), ("kernel", 1)] if kernel else [])
        if round_:
            assert "new event" not in cp.log and "pinned" not in cp.log
        swap.reclaim()
        back = [swap.swap_in(t, compute, defer=True) for t in tickets]
        swap.flush(compute)
        for new, old in zip([p for b in back for p in b], pages):
            assert_bits(pool, new, data[old])
        swap.reclaim()
        pool.free([p for b in back for p in b])
        check(pool, swap)
    assert swap.num_calls == {"out": 2, "in": 2} and swap.copy_s["out"] == 2e-3   # stand-in: 1 ms a copy


# ---- the copy kernel (pagemem.kernels.swap_copy) -------------------------------------------------
def test_copy_kernel_launch_shape_and_word_size():
    """Words: the widest of 16/8/4/2/1 bytes dividing the page and both addresses; a block moves
    at most 2048 words of one page, so a 1 MiB page spreads over 32 blocks of grid y."""
    from pagemem.kernels.swap_copy import launch_shape, word_bytes
    assert word_bytes(32 << 10, 256, 4096) == 16 and word_bytes(24, 256, 512) == 8
    assert word_bytes(32 << 10, 256, 4100) == 4 and word_bytes(6, 0, 0) == 2
    assert launch_shape(256, 32 << 10, 16) == ((256, 1), 2048)
    assert launch_shape(3, 1 << 20, 16) == ((3, 32), 2048)
    assert launch_shape(100_000, 24, 8) == ((65535, 1), 3)


@pytest.mark.parametrize("args, exc, name", [
    ((1.5, 16, 0, 0, 1, 32), TypeError, "src_ptr"), ((16, 16, 0, -8, 1, 32), ValueError, "dst_rows_ptr"),
    ((16, 16, 0, 0, True, 32), TypeError, "num_pages"), ((16, 16, 0, 0, 1, 0), ValueError, "page_bytes"),
    ((0, 16, 0, 0, 1, 32), ValueError, "src_ptr"),
])
def test_copy_kernel_refuses_bad_arguments_by_name(args, exc, name):
    from pagemem.kernels.swap_copy import copy_pages
    with pytest.raises(exc, match=name):
        copy_pages(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("page_bytes", [24, 32 << 10, 1 << 20])
def test_copy_kernel_gathers_and_scatters_pages_bit_exact(page_bytes):
    """Rows read from pinned memory: a gather of scattered pages into consecutive rows and the
    scatter back into other pages equal NumPy fancy indexing, bit for bit."""
    import cupy as cp
    from pagemem.kernels.swap_copy import copy_pages
    num, n = 64, 37
    rng = np.random.default_rng(page_bytes)
    src = cp.asarray(rng.integers(0, 256, (num, page_bytes), dtype=np.uint8))
    stage, dst = cp.zeros((n, page_bytes), cp.uint8), cp.zeros((num, page_bytes), cp.uint8)
    mem = cp.cuda.alloc_pinned_memory(16 * n)
    rows = np.frombuffer(mem, np.int64, 2 * n)
    rows[:n] = rng.permutation(num)[:n]
    rows[n:] = rng.permutation(num)[:n]
    stream = cp.cuda.Stream(non_blocking=True)
    stream.wait_event(cp.cuda.get_current_stream().record())   # the upload and zero fills come first
    copy_pages(src.data.ptr, stage.data.ptr, rows.ctypes.data, 0, n, page_bytes, stream)
    copy_pages(stage.data.ptr, dst.data.ptr, 0, rows[n:].ctypes.data, n, page_bytes, stream)
    stream.synchronize()
    np.testing.assert_array_equal(stage.get(), src.get()[rows[:n]])
    np.testing.assert_array_equal(dst.get()[rows[n:]], src.get()[rows[:n]])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [False, True], ids=["cupy-take", "copy-kernel"])
@pytest.mark.parametrize("path", ["runs", "gather"])
def test_gpu_deferred_swap_out_is_copied_before_the_compute_stream_writes_the_pages(path, kernel):
    """Deferred swap-outs of 1024 scattered pages whose pages are handed out again at once; after
    the flush a long kernel queue on the compute stream overwrites them. The host copies hold the
    old bytes (the compute stream waited on the copy) and a deferred swap-in brings them back."""
    import cupy as cp
    from pagemem.kernels.swap_copy import copy_pages
    pool, swap = make(num_pages=2049, num_host_pages=2048, device="cuda", page_size=16, path=path,
                      copy_kernel=copy_pages if kernel else None)
    pages = pool.allocate(2048)
    ids = np.random.default_rng(3).permutation(pages)[:1024].tolist()
    compute = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Stream.null.synchronize()  # the pool's zero fill ran on the legacy stream
    with compute:
        pool.kv[cp.asarray(ids)] = 1.5
    tickets = [swap.swap_out(ids[i:i + 256], compute, defer=True) for i in range(0, 1024, 256)]
    reused = pool.allocate(1024)                   # the same pages, to a new owner, before any copy
    assert sorted(reused) == sorted(ids)
    swap.flush(compute)
    with compute:
        idx = cp.asarray(reused)
        view = pool.kv[idx].astype(cp.float32)
        for _ in range(20):               # a long elementwise kernel queue ends with the write
            view = cp.sin(view) * 0 - 2.0
        pool.kv[idx] = view.astype(pool.kv.dtype)
    for t in tickets:
        swap.wait(t)
        assert (swap.host[t.host_slots] == np.float16(1.5)).all()
    pool.free(reused)
    back = [p for t in tickets for p in swap.swap_in(t, compute, defer=True)]
    swap.flush(compute)
    with compute:
        got = pool.kv[cp.asarray(back)].get(stream=compute)
    compute.synchronize()
    assert (got == np.float16(1.5)).all() and swap.num_calls == {"out": 1, "in": 1}
    swap.reclaim(wait=True)
    check(pool, swap)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["auto", "gather"])
def test_random_cycles_bit_exact_gpu_with_the_copy_kernel(path):
    from test_swap import random_cycles
    from pagemem.kernels.swap_copy import copy_pages
    random_cycles("cuda", steps=600, seed=13, path=path,
                  make_fn=lambda **kw: make(**kw, copy_kernel=copy_pages))


def test_a_copy_kernel_must_be_callable():
    pool = PagePool(PoolConfig(8, 4, 2, 2, 8, "float16", "cpu"))
    from pagemem import HostSwap
    with pytest.raises(TypeError, match="copy_kernel"):
        HostSwap(pool, 4, copy_kernel="copy_pages")
