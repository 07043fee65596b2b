"""Host cost of swapping: HostSwap and PagePool bookkeeping per call, on the CPU, each beside a
baseline measured in the same run and pytest-benchmark group.

On a GPU a small page (32 KiB) crosses PCIe in ~0.6 µs, so Python spent per page before or
while the copies are enqueued caps small-page swap speed. Here pages hold 1 token of 1 layer,
1 KV head and head_dim 1 (4 bytes), so the NumPy copies are negligible and what is timed is
the bookkeeping: checks, page and host-slot accounting, queues. Pages are scattered (the pool's
free queue starts as a random permutation), as in a pool that has been running a while.
Baselines: the same cycle on plain Python lists (a free stack of pages, one of host slots, the
same NumPy copies, no checks, tickets or plans); allocate+free on a list and on vLLM's doubly
linked free list (bench/_harness.py); the copy plan's host runs found by a Python loop.

Run: pytest bench/bench_swap_host.py --benchmark-only --benchmark-group-by=group --no-cov
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script or under pytest
from bench._harness import BASELINE_POOLS, ListPool  # noqa: E402
from pagemem import HostSwap, PagePool, PoolConfig  # noqa: E402
from pagemem._swap_copy import plan_copies  # noqa: E402

SIZES = (256, 2048)


def make_swap(n: int, seed: int = 0) -> tuple[PagePool, HostSwap]:
    """A pool of 2n usable 4-byte pages, free queue in random order, and n host pages."""
    pool = PagePool(PoolConfig(2 * n + 1, 1, 1, 1, 1, "float16", "cpu"))
    pool.free(np.random.default_rng(seed).permutation(pool.allocate(2 * n)).tolist())
    return pool, HostSwap(pool, n)


class ListSwap:
    """The baseline cycle: a ListPool of 2n pages (scattered free order), a list of n free host
    slots, and the copies HostSwap makes on the CPU, as fancy-indexed NumPy assignments."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.pool = ListPool(2 * n + 1)
        self.pool.free(np.random.default_rng(seed).permutation(self.pool.allocate(2 * n)).tolist())
        self.kv = np.zeros((2 * n + 1, 1, 2, 1, 1, 1), np.float16)
        self.host = np.zeros((n, 1, 2, 1, 1, 1), np.float16)
        self.host_free = list(range(n - 1, -1, -1))

    def swap_out(self, pages: list[int]) -> list[int]:
        slots = self.host_free[-len(pages):][::-1]
        del self.host_free[-len(pages):]
        self.host[slots] = self.kv[pages]
        self.pool.free(pages[::-1])
        return slots

    def swap_in(self, slots: list[int]) -> list[int]:
        pages = self.pool.allocate(len(slots))
        self.kv[pages] = self.host[slots]
        self.host_free.extend(reversed(slots))
        return pages


@pytest.mark.parametrize("impl", ["hostswap", "python-lists"])
@pytest.mark.parametrize("n", SIZES)
def test_swap_cycle(benchmark, n, impl):
    """One cycle: swap_out of n pages, reclaim, swap_in, reclaim, free the pages in reverse and
    allocate n again (the life of a preempted sequence). extra_info has µs per page."""
    benchmark.group = f"swap host cost, {n} pages a call"
    if impl == "hostswap":
        pool, swap = make_swap(n)
        pages = pool.allocate(n)

        def cycle():
            nonlocal pages
            ticket = swap.swap_out(pages)
            swap.reclaim()
            back = swap.swap_in(ticket)
            swap.reclaim()
            pool.free(back[::-1])
            pages = pool.allocate(n)
    else:
        base = ListSwap(n)
        pages = base.pool.allocate(n)

        def cycle():
            nonlocal pages
            back = base.swap_in(base.swap_out(pages))
            base.pool.free(back[::-1])
            pages = base.pool.allocate(n)

    benchmark.pedantic(cycle, rounds=200 if n > 256 else 1000, iterations=1, warmup_rounds=20)
    if impl == "hostswap":
        pool.check_integrity()
        swap.check_integrity()
        assert swap.num_free_host_pages == n and pool.num_free_pages == n
    else:
        assert len(base.host_free) == n and len(base.pool.free_pages) == n
    benchmark.extra_info.update(pages_per_call=n, impl=impl)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["us_per_page"] = benchmark.stats.stats.median * 1e6 / n


@pytest.mark.parametrize("impl", ["pagemem", *BASELINE_POOLS])
@pytest.mark.parametrize("n", SIZES)
def test_allocate_free_many(benchmark, n, impl):
    """free(allocate(n)) on a pool of 2n pages whose free queue is scattered."""
    benchmark.group = f"allocate+free many, {n} pages a call"
    if impl == "pagemem":
        pool, _ = make_swap(n)
    else:
        pool = BASELINE_POOLS[impl](2 * n + 1)
        pool.free(np.random.default_rng(0).permutation(pool.allocate(2 * n)).tolist())
    benchmark.pedantic(lambda: pool.free(pool.allocate(n)), rounds=200 if n > 256 else 1000,
                       iterations=1, warmup_rounds=20)
    assert sorted(pool.allocate(2 * n)) == list(range(1, 2 * n + 1))   # nothing lost or doubled
    benchmark.extra_info.update(pages_per_call=n, impl=impl)


def loop_host_runs(slots: list[int], staging_pages: int) -> list[tuple[int, int, int]]:
    """The baseline plan: (position, host slot, length) runs of a gathered copy by a Python loop."""
    runs: list[list[int]] = []
    for i, h in enumerate(slots):
        if runs and i % staging_pages and h == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([i, h, 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("impl", ["plan_copies", "python-loop"])
@pytest.mark.parametrize("n", SIZES)
def test_copy_plan(benchmark, n, impl):
    """What a CUDA swap_out of n scattered 32 KiB pages computes before its first CUDA call:
    plan_copies (path choice and host runs; here "gather", one chunk) from the checked id list."""
    benchmark.group = f"swap plan (CUDA path, host side), {n} pages"
    ids = np.random.default_rng(0).permutation(np.arange(1, 2 * n + 1))[:n].tolist()
    slots = np.arange(n)                     # swap_out takes the lowest free host slots
    if impl == "plan_copies":
        plan = benchmark(plan_copies, ids, slots, "auto", 32 << 10, 8 << 20, 8192)
        assert plan.path == "gather" and plan.runs == [(0, 0, n)]
    else:
        assert benchmark(loop_host_runs, slots.tolist(), 8192) == [(0, 0, n)]
