"""Preemptor: swap and recompute preemption, resume after a swap, and the measured cost model of 'auto'."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import (NULL_PAGE, HostSwap, OutOfHostPages, OutOfPages, PagePool, PoolConfig, Preempted,
                     Preemptor, PrefixCache, SeqPages)

PS = 4


def make(num_pages: int = 13, num_host_pages: int = 8, rate: float | None = None):
    pool = PagePool(PoolConfig(num_pages, PS, 1, 1, 4, "float32", "cpu"))
    swap = HostSwap(pool, num_host_pages)
    return pool, swap, Preemptor(swap, rate)


def seq_with(pool: PagePool, num_tokens: int, seed: int = 0) -> SeqPages:
    seq = SeqPages(pool)
    seq.append(num_tokens)
    rng = np.random.default_rng(seed)
    for p in seq.page_table:
        pool.kv[p] = rng.standard_normal(pool.kv.shape[1:])
    return seq


def check(pool, swap):
    pool.check_integrity()
    swap.check_integrity()


def test_swap_preempt_and_resume_restores_data_and_keeps_shared_pages_resident():
    pool, swap, pre = make()
    parent = seq_with(pool, 10)                   # pages a b c
    child = parent.fork()                         # shares a b c
    child.append(3)                               # copy-on-write: c -> c', then d
    a, b, _c = parent.page_table
    data = {i: pool.kv[p].copy() for i, p in enumerate(child.page_table)}
    p = pre.preempt(child, "swap")
    check(pool, swap)
    assert child.page_table == [] and child.num_tokens == 0
    assert p.mode == "swap" and p.swapped_at == [2, 3]           # only the exclusive pages
    assert p.page_table == [a, b, NULL_PAGE, NULL_PAGE] and pool.refcount(a) == 2
    assert swap.num_free_host_pages == 6
    seq = pre.resume(p)
    check(pool, swap)
    assert seq.num_tokens == 13 and seq.page_table[:2] == [a, b]
    for i, page_id in enumerate(seq.page_table):
        np.testing.assert_array_equal(pool.kv[page_id], data[i])
    with pytest.raises(ValueError, match="not yet resumed"):
        pre.resume(p)


def test_recompute_preempt_frees_every_page_and_leaves_nothing_to_resume():
    pool, swap, pre = make()
    tokens = list(range(1, 12))                   # 11 tokens: pages 0, 1 full, page 2 partial
    seq = seq_with(pool, 11)
    PrefixCache(pool).register(seq.page_table, tokens)
    p = pre.preempt(seq, "recompute")
    check(pool, swap)
    assert p.mode == "recompute" and p.num_tokens == 11 and pool.stats().num_used == 0
    with pytest.raises(ValueError, match="swap Preempted"):   # its tokens are prefilled again instead
        pre.resume(p)


def test_swap_mode_with_host_full_raises_and_changes_nothing():
    pool, swap, pre = make(num_host_pages=2)
    seq = seq_with(pool, 12)                      # 3 exclusive pages, 2 host pages
    table = list(seq.page_table)
    with pytest.raises(OutOfHostPages):
        pre.preempt(seq, "swap")
    assert seq.page_table == table and seq.num_tokens == 12
    check(pool, swap)


def test_auto_falls_back_to_recompute_when_host_is_full():
    pool, swap, pre = make(num_host_pages=2, rate=1e6)
    seq = seq_with(pool, 12)
    assert pre.choose(seq) == "recompute"
    assert pre.preempt(seq).mode == "recompute"


def test_auto_uses_measured_figures():
    """With measured bandwidths, 'auto' picks whichever of swap and recompute the figures say is cheaper."""
    pool, swap, pre = make(rate=1.0)
    warm = seq_with(pool, 4)
    pre.resume(pre.preempt(warm, "swap"))          # one measured round trip
    seq = seq_with(pool, 8)
    pb = pool.config.page_bytes
    cost = 2 * pb / swap.bandwidth("out") + 2 * pb / swap.bandwidth("in")
    assert pre.swap_cost_s(2) == pytest.approx(cost)
    pre.set_prefill_rate(8 / (cost * 10))          # recompute 10x slower than the swap
    assert pre.choose(seq) == "swap"
    pre.set_prefill_rate(8 / (cost / 10))          # recompute 10x faster
    assert pre.choose(seq) == "recompute"


def test_auto_without_prefill_rate_is_a_caller_error():
    pool, swap, pre = make()
    pre.resume(pre.preempt(seq_with(pool, 4), "swap"))
    seq = seq_with(pool, 4)
    with pytest.raises(ValueError, match="set_prefill_rate"):
        pre.preempt(seq)
    assert seq.num_tokens == 4
    with pytest.raises(ValueError, match="tokens_per_s"):
        pre.set_prefill_rate(0)


def test_resume_without_pages_raises_out_of_pages_and_changes_nothing():
    pool, swap, pre = make(num_pages=5)
    p = pre.preempt(seq_with(pool, 12), "swap")
    hog = pool.allocate(2)
    with pytest.raises(OutOfPages):
        pre.resume(p)
    assert not p.spent and pool.stats().num_used == 2 and swap.num_free_host_pages == swap.num_host_pages - 3
    pool.free(hog)
    seq = pre.resume(p)
    assert seq.num_tokens == 12
    check(pool, swap)


def test_discard_releases_everything():
    pool, swap, pre = make()
    parent = seq_with(pool, 8)
    child = parent.fork()
    child.append(4)
    p = pre.preempt(child, "swap")
    pre.discard(p)
    parent.free()
    check(pool, swap)
    assert pool.stats().num_used == 0 and swap.num_free_host_pages == swap.num_host_pages


def test_bad_mode_and_foreign_seq():
    pool, swap, pre = make()
    other = PagePool(PoolConfig(5, PS, 1, 1, 4, "float32", "cpu"))
    with pytest.raises(ValueError, match="mode"):
        pre.preempt(seq_with(pool, 4), "evict")
    with pytest.raises(ValueError, match="this Preemptor's pool"):
        pre.preempt(seq_with(other, 4), "swap")
    with pytest.raises(ValueError, match="Preempted"):
        pre.resume("p")
    assert isinstance(pre.preempt(seq_with(pool, 4), "recompute"), Preempted)


def test_deferred_swap_preemptions_free_pages_at_once_and_resume_in_one_flush():
    """Two sequences preempted with defer: their exclusive pages are free at once (shared ones stay),
    one flush copies both out; resumed with defer, one flush brings both back with their data."""
    pool, swap, pre = make(num_pages=17, num_host_pages=12)
    a = seq_with(pool, 10, seed=1)
    b = a.fork()
    b.append(5)                                   # copy-on-write of a's last page, then one more
    c = seq_with(pool, 6, seed=2)
    data = {name: [pool.kv[p].copy() for p in s.page_table] for name, s in (("b", b), ("c", c))}
    free = pool.num_free_pages
    pb, pc = pre.preempt(b, "swap", defer=True), pre.preempt(c, "swap", defer=True)
    assert pool.num_free_pages == free + 2 + 2 and swap.num_calls["out"] == 0
    assert swap.flush() == 4 and swap.num_calls["out"] == 1
    check(pool, swap)
    sb, sc = pre.resume(pb, defer=True), pre.resume(pc, defer=True)
    assert swap.flush() == 4 and swap.num_calls["in"] == 1
    for name, s in (("b", sb), ("c", sc)):
        for p, d in zip(s.page_table, data[name]):
            np.testing.assert_array_equal(pool.kv[p], d)
    assert sb.page_table[:2] == a.page_table[:2]  # the shared pages stayed resident
    check(pool, swap)


def test_engine_measure_costs_feeds_auto_and_leaves_the_engine_as_it_was():
    """LLM.measure_costs (random:tiny on the CPU) sets the Preemptor's prefill rate and gives the
    HostSwap its first bandwidth figures from real copies; the pool is whole again and the next
    generate() gives the tokens of an engine that measured nothing."""
    from pagemem.models import SamplingParams
    from pagemem.models.engine import LLM
    kw = dict(device="cpu", num_pages=64, page_size=4, swap_space=64 * 4096 / 2**30, preemption="auto")
    fresh, measured = LLM("random:tiny", **kw), LLM("random:tiny", **kw)
    assert measured.scheduler.preemptor.prefill_tokens_per_s is None and measured.swap.bandwidth("out") is None
    free = measured.pool.num_free_pages
    got = measured.measure_costs(num_tokens=40, num_pages=8)
    assert got["prefill_tokens_per_s"] == measured.scheduler.preemptor.prefill_tokens_per_s > 0
    assert got["swap_out_bytes_per_s"] == measured.swap.bandwidth("out") > 0
    assert got["swap_in_bytes_per_s"] == measured.swap.bandwidth("in") > 0
    assert measured.swap.num_pages_out == 16 and measured.pool.num_free_pages == free
    assert measured.swap.num_free_host_pages == measured.swap.num_host_pages
    measured.pool.check_integrity()
    prompts, params = [[3, 1, 4, 1, 5], [9, 2, 6]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in measured.generate(prompts, params)] == \
        [o.token_ids for o in fresh.generate(prompts, params)]
