"""Bookkeeping cost: allocate + free at growing pool sizes, and pack_batch for a large decode step.

The pool's bookkeeping is host-side Python, so these run on the CPU whatever the device.
Run: pytest bench/bench_pool.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest

from pagemem import PagePool, PoolConfig, SeqPages, pack_batch


def make_pool(num_pages: int, page_size: int = 16) -> PagePool:
    # A minimal page (1 layer, 1 head, head_dim 1) keeps a 1M-page pool at 32 MB: only bookkeeping is timed.
    return PagePool(PoolConfig(num_pages, page_size, 1, 1, 1, "float16", "cpu"))


@pytest.mark.benchmark(group="allocate+free")
@pytest.mark.parametrize("num_pages", [1_000, 100_000, 1_000_000], ids=["1k", "100k", "1M"])
@pytest.mark.parametrize("n", [1, 64])
def test_allocate_free(benchmark, num_pages, n):
    pool = make_pool(num_pages)
    held = pool.allocate(num_pages // 2)   # a half-full pool, as in steady state

    def allocate_free():
        pool.free(pool.allocate(n))

    benchmark.pedantic(allocate_free, rounds=2000, iterations=10, warmup_rounds=1000)
    benchmark.extra_info.update(num_pages=num_pages, pages_per_call=n)
    pool.free(held)
    pool.check_integrity()


@pytest.mark.benchmark(group="pack_batch")
def test_pack_batch_256x128(benchmark):
    """A decode step of 256 sequences of 128 pages (2048 tokens each at page_size 16)."""
    pool = make_pool(256 * 128 + 1)
    seqs = [SeqPages(pool) for _ in range(256)]
    for s in seqs:
        s.append(128 * 16)
    batch = benchmark(pack_batch, seqs, [1] * 256)
    assert batch.page_tables.shape == (256, 128)
    benchmark.extra_info.update(num_seqs=256, pages_per_seq=128)
