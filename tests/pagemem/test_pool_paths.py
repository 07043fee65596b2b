"""Paths no other test reached: fragmentation against a hand count, PoolConfig.from_memory's CUDA
branch and the backend's CUDA probes, each with a stand-in for the device (a module posing as
CuPy, or the free-memory probe replaced)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

import pagemem.backend as backend
import pagemem.config as config
from pagemem import FIFO, PagePool, PoolConfig, SeqPages


def test_fragmentation_against_a_hand_count():
    """page_size 4: 5 tokens in 2 pages (3 empty slots), 8 in 2 (none), 1 in 1 (3 empty):
    6 empty of 20 slots."""
    pool = PagePool(PoolConfig(9, 4, 1, 1, 4, "float32", "cpu"))
    seqs = [SeqPages(pool) for _ in range(3)]
    for s, n in zip(seqs, (5, 8, 1)):
        s.append(n)
    stats = pool.stats(seqs)
    assert stats.fragmentation == 6 / 20
    assert (stats.num_used, stats.num_free, stats.utilization) == (5, 3, 5 / 8)
    assert pool.stats().fragmentation == 0.0 and pool.stats(seqs[1:2]).fragmentation == 0.0


def test_from_memory_on_cuda_takes_a_share_of_free_memory(monkeypatch):
    """The CUDA branch with the free-memory probe replaced: num_pages = int(free * utilization)
    // page_bytes; memory_bytes, when given, wins and the probe is not asked."""
    asked = []

    def probe():
        asked.append(True)
        return 10 << 20, 80 << 20                 # 10 MiB free of 80
    monkeypatch.setattr(config, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(config, "free_device_memory", probe)
    shape = dict(page_size=16, num_layers=16, num_kv_heads=8, head_dim=128, dtype="float16")  # 1 MiB pages
    assert PoolConfig.from_memory(**shape, gpu_memory_utilization=0.55).num_pages == 5   # 5.5 MiB
    assert PoolConfig.from_memory(**shape).num_pages == 9 and len(asked) == 2           # default 0.9
    assert PoolConfig.from_memory(**shape, memory_bytes=3 << 20).num_pages == 3 and len(asked) == 2
    with pytest.raises(ValueError, match="fewer than 2 pages"):
        PoolConfig.from_memory(**shape, gpu_memory_utilization=0.15)                    # 1.5 MiB
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        PoolConfig.from_memory(**shape, gpu_memory_utilization=1.5)
    assert len(asked) == 3                                                              # checked first


class StandInCupy(SimpleNamespace):
    """A module posing as CuPy: a device count (or a driver error), memory info, a device name."""

    def __init__(self, count=1, error=None):
        def get_count():
            if error is not None:
                raise error
            return count
        runtime = SimpleNamespace(getDeviceCount=get_count, memGetInfo=lambda: (3, 4),
                                  getDeviceProperties=lambda i: {"name": b"Stand-in GPU"})
        super().__init__(cuda=SimpleNamespace(runtime=runtime, Device=lambda: SimpleNamespace(id=0)))


@pytest.mark.parametrize("cupy, reason", [
    (None, "CuPy is not installed"),
    (StandInCupy(error=RuntimeError("driver too old")), "CUDA driver is not usable: driver too old"),
    (StandInCupy(count=0), "no CUDA device is visible"),
    (StandInCupy(count=1), None),
])
def test_cuda_unavailable_reason_for_each_case(monkeypatch, cupy, reason):
    monkeypatch.setitem(sys.modules, "cupy", cupy)      # None: `import cupy` raises ImportError
    got = backend.cuda_unavailable_reason.__wrapped__()  # the uncached probe: the cache stays the real one's
    assert got is None if reason is None else reason in got


def test_backend_with_a_device_present(monkeypatch):
    """With CUDA reported usable: "auto" resolves to it, array_module and module_of give CuPy,
    the memory and name probes ask it."""
    fake = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: None)
    assert backend.resolve_device("auto") == "cuda" == backend.resolve_device("cuda")
    assert backend.array_module("cuda") is fake and backend.array_module("cpu") is np
    assert backend.free_device_memory() == (3, 4)
    assert backend.device_name_of("cuda") == "Stand-in GPU" and backend.device_name_of("cpu").startswith("CPU")

    class DeviceArray:
        __module__ = "cupy._core.core"

        def get(self):
            return np.arange(3)
    assert backend.module_of(DeviceArray()) is fake and backend.module_of(np.zeros(1)) is np
    assert backend.to_host(DeviceArray()).tolist() == [0, 1, 2]
    x = np.zeros(2)
    assert backend.to_host(x) is x
    with pytest.raises(TypeError, match="numpy or cupy array"):
        backend.module_of([1, 2])
    with pytest.raises(TypeError, match="device must be a str"):
        backend.resolve_device(None)


def _corrupt(how: str) -> PagePool:
    """A pool (pages 1-3 used, 3 cached under "k3", page 2 evictable under "k2") broken one way."""
    pool = PagePool(PoolConfig(8, 4, 1, 1, 4, "float32", "cpu"))
    pool.allocate(3)
    pool.cache_page(3, "k3")
    pool.cache_page(2, "k2")
    pool.free([2])
    if how == "null":
        pool._refcount[0] = 1
    elif how == "queue":
        pool._free.append(pool._free[0])
    elif how == "negative":
        pool._refcount[1] = -1
    elif how == "key":
        pool._key_of[pool._free[0]] = "stray"
        pool._page_of["stray"] = pool._free[0]
    elif how == "index":
        del pool._page_of["k3"]
    return pool


@pytest.mark.parametrize("how, match", [
    ("null", "NULL_PAGE is referenced"), ("queue", "queue sizes: free 5 vs 4 distinct"),
    ("negative", r"negative refcounts at \[1\]"), ("key", "a clean free page has a cache key"),
    ("index", "cache index mismatch: 2 keys by page, 1 pages by key"),
])
def test_check_integrity_names_each_broken_invariant(how, match):
    _corrupt("none").check_integrity()
    with pytest.raises(RuntimeError, match=match):
        _corrupt(how).check_integrity()


def test_copy_page_and_cache_page_refuse_pages_in_the_wrong_state():
    """copy_page needs a used source and a private, uncached destination; cache_page a used page.
    Refused calls change nothing."""
    pool = PagePool(PoolConfig(8, 4, 1, 1, 4, "float32", "cpu"))
    a, b, c = pool.allocate(3)
    pool.share([b])
    pool.cache_page(c, "kc")
    pool.kv[a] = 1.0
    before = pool.kv.copy()
    for src, dst in ((a, b), (a, c), (7, a)):          # dst shared; dst cached; src free
        with pytest.raises(ValueError, match="copy_page"):
            pool.copy_page(src, dst)
    with pytest.raises(ValueError, match="cache_page: page 7 is free"):
        pool.cache_page(7, "k7")
    np.testing.assert_array_equal(pool.kv, before)
    [d] = pool.allocate(1)                              # private and uncached
    pool.copy_page(a, d)
    assert (pool.kv[d] == 1.0).all()
    pool.check_integrity()


def test_fifo_heap_stays_small_over_revive_cycles():
    """Reviving and freeing a cached page leaves a stale heap entry each time; the heap is
    compacted past 2 x live + 64 entries, and the eviction order (first cached first) holds."""
    fifo = FIFO()
    for p in (1, 2, 3):
        fifo.add(p)
    for _ in range(500):                 # page 2 revived and freed again, 500 times
        fifo.remove(2)
        fifo.add(2)
    assert len(fifo._heap) <= 2 * len(fifo) + 65
    assert [fifo.pop_victim() for _ in range(3)] == [1, 2, 3]


def test_swap_check_integrity_names_each_broken_invariant():
    """HostSwap.check_integrity: a host slot held by two tickets, a spent ticket still live, and a
    page held by an in-flight swap-out whose reference was dropped behind its back."""
    from test_swap import InFlightSwap
    from pagemem import HostSwap
    pool = PagePool(PoolConfig(8, 4, 1, 1, 4, "float16", "cpu"))
    swap = HostSwap(pool, 4)
    t1, t2 = swap.swap_out(pool.allocate(1)), swap.swap_out(pool.allocate(1))
    swap.check_integrity()
    t2.host_slots[0] = t1.host_slots[0]
    with pytest.raises(RuntimeError, match=r"host slots held twice: \[0\]"):
        swap.check_integrity()
    t2.host_slots[0], t1.state = 1, "in"
    with pytest.raises(RuntimeError, match="a spent or foreign ticket is live"):
        swap.check_integrity()
    flight = InFlightSwap(pool, 2)
    [p] = pool.allocate(1)
    flight.swap_out([p])
    flight.check_integrity()
    pool._refcount[p] = 0
    with pytest.raises(RuntimeError, match=rf"pages \[{p}\] held by in-flight swap-outs have refcount 0"):
        flight.check_integrity()
