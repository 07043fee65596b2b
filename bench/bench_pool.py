"""Bookkeeping cost: allocate + free at growing pool sizes, and pack_batch for a large decode step,
each beside a baseline measured in the same run and the same pytest-benchmark group: the same
operations on a plain Python list (a free stack, refcounts, no checks), on vLLM's doubly linked
free list (bench/_harness.py), and a pack_batch written as a per-sequence Python loop.

The pool's bookkeeping is host-side Python, so these run on the CPU whatever the device.
Run: pytest bench/bench_pool.py --benchmark-only --benchmark-group-by=group --no-cov
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script or under pytest
from bench._harness import BASELINE_POOLS  # noqa: E402
from pagemem import NULL_PAGE, PagePool, PoolConfig, SeqPages, pack_batch  # noqa: E402


def make_pool(num_pages: int, page_size: int = 16) -> PagePool:
    # A minimal page (1 layer, 1 head, head_dim 1) keeps a 1M-page pool at 32 MB: only bookkeeping is timed.
    return PagePool(PoolConfig(num_pages, page_size, 1, 1, 1, "float16", "cpu"))


@pytest.mark.parametrize("impl", ["pagemem", *BASELINE_POOLS])
@pytest.mark.parametrize("num_pages", [1_000, 100_000, 1_000_000], ids=["1k", "100k", "1M"])
@pytest.mark.parametrize("n", [1, 64])
def test_allocate_free(benchmark, num_pages, n, impl):
    """pool.free(pool.allocate(n)) on a half-full pool (steady state); a baseline does the same."""
    benchmark.group = f"allocate+free {num_pages} pages, {n} a call"
    pool = make_pool(num_pages) if impl == "pagemem" else BASELINE_POOLS[impl](num_pages)
    held = pool.allocate(num_pages // 2)

    def allocate_free():
        pool.free(pool.allocate(n))

    benchmark.pedantic(allocate_free, rounds=2000, iterations=10, warmup_rounds=1000)
    benchmark.extra_info.update(num_pages=num_pages, pages_per_call=n, impl=impl)
    again = pool.allocate(num_pages - 1 - len(held))     # every page is still there exactly once
    assert sorted(again + held) == list(range(1, num_pages))
    if impl == "pagemem":
        pool.check_integrity()


def loop_pack(seqs: list[SeqPages], query_lens: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baseline: page_tables, context_lens and slot_mapping with a Python loop per sequence."""
    ps = seqs[0].pool.page_size
    max_pages = max(len(s.page_table) for s in seqs)
    pt = np.full((len(seqs), max_pages), NULL_PAGE, np.int32)      # [num_seqs, max_pages]
    slots = []
    for i, (s, q) in enumerate(zip(seqs, query_lens)):
        pt[i, :len(s.page_table)] = s.page_table
        slots += [s.page_table[t // ps] * ps + t % ps for t in range(s.num_tokens - q, s.num_tokens)]
    ctx = np.array([s.num_tokens for s in seqs], np.int32)
    return pt, ctx, np.array(slots, np.int32)


@pytest.mark.benchmark(group="pack_batch 256 seqs x 128 pages")
@pytest.mark.parametrize("impl", ["pagemem", "python-loop"])
def test_pack_batch_256x128(benchmark, impl):
    """A decode step of 256 sequences of 128 pages (2048 tokens each at page_size 16)."""
    pool = make_pool(256 * 128 + 1)
    seqs = [SeqPages(pool) for _ in range(256)]
    for s in seqs:
        s.append(128 * 16)
    batch = pack_batch(seqs, [1] * 256)
    pt, ctx, slots = loop_pack(seqs, [1] * 256)                    # both give the same arrays
    assert (batch.page_tables == pt).all() and (batch.context_lens == ctx).all()
    assert (batch.slot_mapping == slots).all()
    if impl == "pagemem":
        benchmark(pack_batch, seqs, [1] * 256)
    else:
        benchmark(loop_pack, seqs, [1] * 256)
    benchmark.extra_info.update(num_seqs=256, pages_per_seq=128, impl=impl)
