"""Host cost of swapping: HostSwap and PagePool bookkeeping per call, on the CPU.

On a GPU a small page (32 KiB) crosses PCIe in ~0.6 µs, so Python spent per page before or
while the copies are enqueued caps small-page swap speed. Here pages hold 1 token of 1 layer,
1 KV head and head_dim 1 (4 bytes), so the NumPy copies are negligible and what is timed is
the bookkeeping: checks, page and host-slot accounting, queues. Pages are scattered (the pool's
free queue starts as a random permutation), as in a pool that has been running a while.

Run: pytest bench/bench_swap_host.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import HostSwap, PagePool, PoolConfig
from pagemem._swap_copy import plan_copies

SIZES = (256, 2048)


def make_swap(n: int, seed: int = 0) -> tuple[PagePool, HostSwap]:
    """A pool of 2n usable 4-byte pages, free queue in random order, and n host pages."""
    pool = PagePool(PoolConfig(2 * n + 1, 1, 1, 1, 1, "float16", "cpu"))
    pool.free(np.random.default_rng(seed).permutation(pool.allocate(2 * n)).tolist())
    return pool, HostSwap(pool, n)


@pytest.mark.benchmark(group="swap host cost")
@pytest.mark.parametrize("n", SIZES)
def test_swap_cycle(benchmark, n):
    """One cycle: swap_out of n pages, reclaim, swap_in, reclaim, free the pages in reverse and
    allocate n again (the life of a preempted sequence). extra_info has µs per page."""
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

    benchmark.pedantic(cycle, rounds=200 if n > 256 else 1000, iterations=1, warmup_rounds=20)
    pool.check_integrity()
    swap.check_integrity()
    benchmark.extra_info.update(pages_per_call=n)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["us_per_page"] = benchmark.stats.stats.median * 1e6 / n


@pytest.mark.benchmark(group="allocate+free many")
@pytest.mark.parametrize("n", SIZES)
def test_allocate_free_many(benchmark, n):
    """pool.free(pool.allocate(n)) on a pool of 2n pages whose free queue is scattered."""
    pool, _ = make_swap(n)
    benchmark.pedantic(lambda: pool.free(pool.allocate(n)), rounds=200 if n > 256 else 1000,
                       iterations=1, warmup_rounds=20)
    pool.check_integrity()
    benchmark.extra_info.update(pages_per_call=n)


@pytest.mark.benchmark(group="swap plan (CUDA path, host side)")
@pytest.mark.parametrize("n", SIZES)
def test_copy_plan(benchmark, n):
    """What a CUDA swap_out of n scattered 32 KiB pages computes before its first CUDA call:
    plan_copies (path choice and host runs; here "gather", one chunk) from the checked id list."""
    ids = np.random.default_rng(0).permutation(np.arange(1, 2 * n + 1))[:n].tolist()
    slots = np.arange(n)                     # swap_out takes the lowest free host slots
    plan = benchmark(plan_copies, ids, slots, "auto", 32 << 10, 8 << 20, 8192)
    assert plan.path == "gather" and plan.runs == [(0, 0, n)]
