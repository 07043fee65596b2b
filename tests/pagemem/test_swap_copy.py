"""HostSwap's CUDA copy paths on the CPU: plans checked by simulating them in NumPy, and PinnedCopier
run against a stand-in for CuPy whose copies are memmoves on NumPy memory and whose calls are logged."""
from __future__ import annotations

import ctypes
import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from pagemem import HostSwap, PagePool, PoolConfig
from pagemem._swap_copy import D2H, H2D, PinnedCopier, copy_numpy, merge_runs, plan_copies
from test_swap import random_cycles

WORDS = 6  # uint32 words per page in these tests: 24-byte pages


def simulate(plan, kv: np.ndarray, host: np.ndarray, direction: int) -> None:
    """Carry out ``plan`` with NumPy copies, chunk by chunk through a staging buffer, as the CUDA path does."""
    if plan.path == "runs":
        for d, h, k in plan.runs:
            if direction == D2H:
                host[h:h + k] = kv[d:d + k]
            else:
                kv[d:d + k] = host[h:h + k]
        return
    m = plan.staging_pages
    stage = np.full((m, kv.shape[1]), 0xDEAD, dtype=kv.dtype)
    for c, c0 in enumerate(range(0, len(plan.ids), m)):
        chunk = plan.ids[c0:c0 + m]
        if direction == D2H:
            stage[:len(chunk)] = kv[chunk]
        for i, h, k in plan.runs[plan.bounds[c]:plan.bounds[c + 1]]:
            assert c0 <= i and i + k <= c0 + len(chunk), "a run crosses a chunk edge"
            if direction == D2H:
                host[h:h + k] = stage[i - c0:i - c0 + k]
            else:
                stage[i - c0:i - c0 + k] = host[h:h + k]
        if direction == H2D:
            kv[chunk] = stage[:len(chunk)]


def scattered_case(rng, n: int, num_pages: int = 64, num_host: int = 48, contiguous_slots: bool = False):
    ids = rng.permutation(np.arange(1, num_pages))[:n]
    slots = np.arange(3, 3 + n) if contiguous_slots else rng.permutation(num_host)[:n]
    kv = rng.integers(0, 1 << 32, size=(num_pages, WORDS), dtype=np.uint32)
    return ids, slots, kv, np.zeros((num_host, WORDS), dtype=np.uint32)


@pytest.mark.parametrize("path", ["runs", "gather"])
@pytest.mark.parametrize("staging_pages", [1, 3, 64])
def test_plan_round_trip_matches_fancy_indexing(path, staging_pages):
    """Any plan, run out then in (to other pages), moves exactly host[slots] = kv[ids] and back."""
    rng = np.random.default_rng(staging_pages)
    for n in (1, 2, 7, 30):
        ids, slots, kv, host = scattered_case(rng, n, contiguous_slots=n == 30)
        plan = plan_copies(ids.tolist(), slots, path, 24, 1 << 20, staging_pages)
        assert plan.path == path
        simulate(plan, kv, host, D2H)
        np.testing.assert_array_equal(host[slots], kv[ids])
        new_ids = np.setdiff1d(np.arange(1, 64), ids)[:n]
        simulate(plan_copies(new_ids, slots.tolist(), path, 24, 1 << 20, staging_pages), kv, host, H2D)
        np.testing.assert_array_equal(kv[new_ids], kv[ids])


def test_plan_bounds_partition_the_runs_by_chunk():
    """Gathered runs stop at staging chunk edges and at host gaps; bounds split them by chunk."""
    # slots 0..9 are one host run, cut by staging chunks of 4: positions [0,4) [4,8) [8,10)
    plan = plan_copies([5, 9, 2, 7, 1, 3, 8, 6, 4, 10], range(10), "gather", 24, 1, 4)
    assert plan.runs == [(0, 0, 4), (4, 4, 4), (8, 8, 2)]
    assert plan.bounds == [0, 1, 2, 3]
    # a host gap splits chunk 0; chunk 1 is one run
    plan = plan_copies([5, 9, 2, 7, 1, 3], [0, 1, 5, 6, 7, 8], "gather", 24, 1, 4)
    assert plan.runs == [(0, 0, 2), (2, 5, 2), (4, 7, 2)]
    assert plan.bounds == [0, 2, 3]


@pytest.mark.parametrize("ids, expected", [
    (list(range(1, 9)), "runs"),                     # 1 run of 8 pages: 192 bytes >= 100
    ([1, 3, 5, 7], "gather"),                        # 4 runs of 1 page: 24 bytes each
    ([1, 2, 3, 4, 9, 10, 11, 12], "gather"),         # 2 runs of 96 bytes
    ([1, 2, 3, 4, 5, 9, 10, 11, 12, 13], "runs"),    # 2 runs of 120 bytes
])
def test_auto_path_compares_the_mean_run_with_min_run_bytes(ids, expected):
    """"auto" copies runs directly when they average min_run_bytes (counted by a plain loop here)."""
    runs = loop_runs(ids, range(len(ids)))
    assert (len(ids) * 24 >= len(runs) * 100) == (expected == "runs")
    assert plan_copies(ids, range(len(ids)), "auto", 24, 100, 64).path == expected


def loop_runs(src, dst, chunk: int | None = None) -> list[tuple[int, int, int]]:
    """The oracle: walk the pairs once, extending the last run while both sides advance by one
    (and, with ``chunk``, the position stays in the same chunk of that many)."""
    runs: list[list[int]] = []
    for i, (s, d) in enumerate(zip(src, dst)):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2] and (
                chunk is None or i % chunk):
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def adjacent_case(rng, n: int) -> tuple[list[int], list[int]]:
    """Ids and slots made of short ascending stretches at random places, so runs of 1 to 5 pages
    occur on either side, together or not."""
    ids, slots = [], []
    while len(ids) < n:
        k = int(rng.integers(1, 6))
        i0, s0 = int(rng.integers(1, 200)), int(rng.integers(0, 200))
        ids += range(i0, i0 + k)
        slots += range(s0, s0 + k) if rng.random() < 0.7 else rng.integers(0, 200, k).tolist()
    return ids[:n], slots[:n]


@pytest.mark.parametrize("seed", range(20))
def test_runs_and_gather_plans_against_a_plain_loop(seed):
    """plan_copies' runs equal the loop's: "runs" over (id, slot) pairs; "gather" over (position,
    slot) pairs cut at staging chunks, with bounds giving each chunk's first run; merge_runs too."""
    rng = np.random.default_rng(seed)
    ids, slots = adjacent_case(rng, int(rng.integers(1, 40)))
    assert plan_copies(ids, slots, "runs", 24, 1, 7).runs == loop_runs(ids, slots) == merge_runs(ids, slots)
    m = int(rng.integers(1, 9))
    plan = plan_copies(ids, slots, "gather", 24, 1, m)
    want = loop_runs(range(len(ids)), slots, chunk=m)
    assert plan.runs == want
    starts = [r[0] for r in want]
    assert plan.bounds == [next(j for j, p in enumerate(starts + [len(ids)]) if p >= c) for c in
                           range(0, len(ids), m)] + [len(want)]


@pytest.mark.parametrize("path", ["runs", "gather", "direct"])
@pytest.mark.parametrize("staging_pages", [1, 3, 64])
def test_copy_numpy_is_fancy_indexing(path, staging_pages):
    """The CPU HostSwap's copies (copy_numpy) move host[slots] = kv[ids] and back, for any plan."""
    rng = np.random.default_rng(staging_pages + 10)
    for n in (1, 2, 7, 30):
        ids, slots, kv, host = scattered_case(rng, n, contiguous_slots=n == 7)
        want = kv[ids].copy()
        copy_numpy(plan_copies(ids, slots, path, 24, 1, staging_pages), kv, host, D2H)
        np.testing.assert_array_equal(host[slots], want)
        kv[ids] = 0
        copy_numpy(plan_copies(ids, slots, path, 24, 1, staging_pages), kv, host, H2D)
        np.testing.assert_array_equal(kv[ids], want)


# ---- PinnedCopier against a stand-in for CuPy ----------------------------------------------------
class DevArray(np.ndarray):
    """NumPy memory standing in for a CuPy array: ``.data.ptr`` is its address."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)


class Pinned(bytearray):
    @property
    def ptr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self))


class FakeCupy:
    """Just the CuPy calls PinnedCopier makes. Copies run at once (a single-stream simulation, so
    program order is stream order); ``log`` names every call in order."""

    int64 = np.int64

    def __init__(self) -> None:
        self.log: list[str] = []
        self.current: list[int] = []     # streams entered (``with stream:``), innermost last
        fake, ptrs = self, itertools.count(1000)

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = next(ptrs)

            def wait_event(self, event):
                fake.log.append(f"wait {self.ptr}")

            def __enter__(self):
                fake.current.append(self.ptr)
                return self

            def __exit__(self, *exc):
                fake.current.pop()
                return False

        class Event:
            done = True  # copies run at once

            def __init__(self, disable_timing=False):
                fake.log.append("new event")

            def record(self, stream=None):
                fake.log.append("record" if stream is None else f"record {stream.ptr}")

            def synchronize(self):
                pass

        def memcpy(dst, src, nbytes, kind, stream):
            fake.log.append(f"memcpy {kind} @{stream}")
            ctypes.memmove(dst, src, nbytes)

        def pinned(nbytes):
            fake.log.append("pinned")
            return Pinned(nbytes)
        class Device:
            attributes = {"MultiProcessorCount": 2}
        self.cuda = SimpleNamespace(Stream=Stream, Event=Event, alloc_pinned_memory=pinned, Device=Device,
                                    runtime=SimpleNamespace(memcpyAsync=memcpy),
                                    get_current_stream=Stream, get_elapsed_time=lambda start, end: 1.0)
        self.launches: list[tuple] = []

    def RawModule(self, code, options=()):  # noqa: N802 -- CuPy's name
        """The direct page-copy kernels, run as memmoves of whole pages (rows read from the id buffer)."""
        fake = self
        assert "pagemem_copy_pages_16" in code and "pagemem_copy_pages_8" in code

        def kernel(vec):
            def run(grid, block, args):
                src, dst, rows, n, words = args
                fake.log.append(f"kernel {vec} @{fake.on()}")
                fake.launches.append((grid, block, int(n), int(words)))
                page = int(words) * vec
                r = np.asarray(rows)[:2 * int(n)]
                for s_row, d_row in zip(r[:int(n)].tolist(), r[int(n):].tolist()):
                    ctypes.memmove(int(dst) + d_row * page, int(src) + s_row * page, page)
            return run
        return SimpleNamespace(get_function=lambda name: kernel(16 if name.endswith("16") else 8))

    def on(self):
        """The stream work is queued on now: the innermost entered, else the default stream."""
        return self.current[-1] if self.current else "default"

    def empty(self, shape, dtype):
        self.log.append("empty")
        return np.full(shape, 0xDEAD, dtype=dtype).view(DevArray)

    def take(self, a, indices, axis, out):
        self.log.append(f"take @{self.on()}")
        np.take(a, indices, axis=axis, out=out)


PREP = ("pinned", "empty", "new event")


def assert_one_burst(log: list[str]) -> None:
    """Every allocation and event creation comes before the first CUDA call of the burst."""
    first = next(i for i, c in enumerate(log) if c.startswith("record"))
    assert not [c for c in log[first:] if c in PREP], log


@pytest.mark.parametrize("path", ["runs", "gather", "direct"])
def test_pinned_copier_moves_pages_both_ways_in_one_burst(path):
    """Scattered pages out and back (staging of 3 pages: several chunks), bit-exact; each call
    allocates and creates events before its first CUDA call, and once earlier calls are released
    none at all (events and pinned id buffers reused); the id buffer grows, then is reused."""
    rng = np.random.default_rng(4)
    cp = FakeCupy()
    kv = rng.integers(0, 1 << 32, size=(64, WORDS), dtype=np.uint32).view(DevArray)
    host = np.zeros((48, WORDS), dtype=np.uint32)
    out = PinnedCopier(D2H, kv, host.ctypes.data, 4 * WORDS, 3, cp=cp)
    in_ = PinnedCopier(H2D, kv, host.ctypes.data, 4 * WORDS, 3, cp=cp)
    compute = cp.cuda.Stream()
    for n in (5, 11, 2):
        ids, slots = rng.permutation(np.arange(1, 64))[:n], rng.permutation(48)[:n]
        expected = np.asarray(kv[ids]).copy()
        idx_before = out._idx
        cp.log.clear()
        call = out.enqueue(plan_copies(ids, slots, path, 4 * WORDS, 1, 3), compute)
        assert_one_burst(cp.log)
        assert isinstance(call.pinned, tuple) == (path != "runs")
        if n != 5:                                          # warm: nothing allocated or created
            assert "pinned" not in cp.log and "new event" not in cp.log, cp.log
        if path != "runs" and n == 2:
            assert out._idx is idx_before                   # big enough: reused
        if path != "runs" and n == 11:
            assert any(k is idx_before for k in call.keep)  # outgrown: kept until this call completes
        assert (f"kernel 8 @{out.stream.ptr}" in cp.log) == (path == "direct")  # 24-byte pages: 8-byte words
        assert (f"take @{out.stream.ptr}" in cp.log) == (path == "gather")     # on the copy stream
        np.testing.assert_array_equal(host[slots], expected)
        out.release(call)
        new_ids = np.setdiff1d(np.arange(1, 64), ids)[rng.permutation(63 - n)[:n]]
        cp.log.clear()
        call = in_.enqueue(plan_copies(new_ids, slots, path, 4 * WORDS, 1, 3), compute)
        assert_one_burst(cp.log)
        assert cp.log[-1] == f"wait {compute.ptr}"          # the compute stream waits on the swap-in
        np.testing.assert_array_equal(np.asarray(kv[new_ids]), expected)
        in_.release(call)


def test_a_pinned_id_buffer_is_not_reused_while_its_call_runs():
    """Two calls in flight get two pinned id buffers; a released one serves the next call, and a
    call too big for every free buffer gets a new, bigger one."""
    cp = FakeCupy()
    kv = np.zeros((64, WORDS), dtype=np.uint32).view(DevArray)
    host = np.zeros((2048, WORDS), dtype=np.uint32)
    out = PinnedCopier(D2H, kv, host.ctypes.data, 4 * WORDS, 64, cp=cp)
    compute = cp.cuda.Stream()
    plan = plan_copies([3, 1, 7], [0, 1, 2], "gather", 4 * WORDS, 1, 64)
    first, second = out.enqueue(plan, compute), out.enqueue(plan, compute)
    assert first.pinned[1] is not second.pinned[1] and {first.start, first.end}.isdisjoint({second.start, second.end})
    buf, events, second_buf = first.pinned[1], (first.start, first.end), second.pinned[1]
    out.release(first)
    third = out.enqueue(plan, compute)
    assert third.pinned[1] is buf and (third.start, third.end) == events
    assert out.enqueue(plan, compute).pinned[1] is not buf          # third still runs: not handed out again
    big = plan_copies(list(range(1, 64)) * 20, list(range(1260)), "gather", 4 * WORDS, 1, 64)
    out.release(second)
    fourth = out.enqueue(big, compute)
    assert len(fourth.pinned[1]) >= 1260 and fourth.pinned[1] is not second_buf


def test_pinned_copier_call_order():
    """A gathered swap-in: buffers and events first; then the copy stream waits on the compute
    stream and the ticket's event, the timed copies run, and the compute stream waits on them."""
    cp = FakeCupy()
    kv = np.zeros((8, WORDS), dtype=np.uint32).view(DevArray)
    host = np.zeros((8, WORDS), dtype=np.uint32)
    copier = PinnedCopier(H2D, kv, host.ctypes.data, 4 * WORDS, 4, cp=cp)
    compute, ticket_event = cp.cuda.Stream(), cp.cuda.Event()
    cp.log.clear()
    copier.enqueue(plan_copies([3, 1], [0, 1], "gather", 4 * WORDS, 1, 4), compute, (ticket_event,))
    own, c = copier.stream.ptr, compute.ptr
    assert cp.log == ["pinned", "empty", "empty", "new event", "new event",     # host side
                      f"record {c}", f"wait {own}", f"wait {own}",   # ready on compute; waits: ready, ticket
                      f"record {own}", f"memcpy 1 @{own}", f"memcpy 1 @{own}",   # start; ids upload; one host run
                      f"record {own}", f"wait {c}"]                  # end; compute waits on it


def test_direct_call_order_and_grid():
    """A direct swap-out: pinned rows and events first; then the wait on the compute stream, the
    rows upload and one kernel between the timing events. 16-byte pages use 16-byte words, and
    the grid stops at two blocks an SM (the stand-in device has 2 SMs)."""
    cp = FakeCupy()
    kv = np.arange(8 * 4, dtype=np.uint32).reshape(8, 4).view(DevArray)     # 16-byte pages
    host = np.zeros((8, 4), dtype=np.uint32)
    copier = PinnedCopier(D2H, kv, host.ctypes.data, 16, 4, cp=cp)
    compute = cp.cuda.Stream()
    cp.log.clear()
    copier.enqueue(plan_copies([5, 2, 7], [1, 0, 6], "direct", 16, 1, 4), compute)
    own, c = copier.stream.ptr, compute.ptr
    assert cp.log == ["pinned", "empty", "new event", "new event",
                      f"record {c}", f"wait {own}", f"record {own}", f"memcpy 1 @{own}", f"kernel 16 @{own}",
                      f"record {own}"]
    np.testing.assert_array_equal(host[[1, 0, 6]], np.asarray(kv)[[5, 2, 7]])
    assert cp.launches[-1] == ((1,), (256,), 3, 1)
    copier.enqueue(plan_copies(list(range(1, 8)) * 300, list(range(7)) * 300, "direct", 16, 1, 4), compute)
    assert cp.launches[-1][0] == (4,)                               # 2100 words: capped at 2 x 2 SMs


def test_direct_path_is_by_name_and_needs_whole_words():
    assert plan_copies([1, 3, 5], [0, 1, 2], "auto", 24, 100, 64).path == "gather"
    assert plan_copies([1, 3, 5], [0, 1, 2], "direct", 24, 100, 64).path == "direct"
    with pytest.raises(ValueError, match="8-byte words"):
        plan_copies([1, 3], [0, 1], "direct", 12, 100, 64)


@pytest.mark.parametrize("path", ["auto", "runs", "gather", "direct"])
def test_host_swap_cuda_branch_against_the_stand_in(path, monkeypatch):
    """HostSwap's CUDA branch (pinned host pages, PinnedCopiers, plans) wired end to end, with
    ``cupy`` resolving to the stand-in for this test: random cycles come back bit-exact."""
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())

    def make_cuda(num_pages, num_host_pages, device, path, staging_bytes):
        pool = PagePool(PoolConfig(num_pages, 4, 2, 2, 8, "float16", "cpu"))
        pool.kv, pool.device = pool.kv.view(DevArray), "cuda"   # this pool's pages pose as device memory
        swap = HostSwap(pool, num_host_pages, path=path, staging_bytes=staging_bytes)
        assert swap.cuda and isinstance(swap._mem, Pinned)
        return pool, swap
    random_cycles("cpu", steps=1000, seed=3, path=path, make_fn=make_cuda)
