"""Scheduler: continuous batching, chunked prefill, preemption by swap / recompute / auto, and the
prefix cache, driven by a toy model whose next token depends on every K/V value in the cache.

If any page were lost, stale or mixed up after a swap, a recompute or a prefix hit, the toy
model's tokens would differ from the ones computed straight from the token list.
"""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import PagePool, PoolConfig, pack_batch
from pagemem.prefix_cache import PrefixCache
from pagemem.scheduler import Scheduler, Status
from pagemem.swap import HostSwap

VOCAB = 97
PAGE_SIZE = 4


def next_token(tokens) -> int:
    """The toy model's rule, from the plain token list."""
    return int(sum((j + 1) * int(t) for j, t in enumerate(tokens)) % VOCAB)


def toy_forward(pool: PagePool, step) -> dict:
    """Store each new token as its K, then read every cached K of each sequence back."""
    reqs, lens = step.requests, step.query_lens
    batch = pack_batch([r.pages for r in reqs], lens)
    k, _ = pool.layer_kv(0)
    new = [t for r, n in zip(reqs, lens) for t in r.token_ids[r.num_computed:r.num_computed + n]]
    s = batch.slot_mapping
    k[s // PAGE_SIZE, s % PAGE_SIZE, 0, 0] = new
    out = {}
    for r in reqs:
        if r.pages.num_tokens == r.num_tokens:          # chunk reached the last token: sample
            slots = r.pages.slots(0, r.num_tokens)
            out[r] = next_token(k[slots // PAGE_SIZE, slots % PAGE_SIZE, 0, 0].astype(np.int64))
    return out


def run(prompts, max_tokens, num_pages, preemption="recompute", prefix=False, host_pages=64,
        max_batched=16, priorities=None, checks=True, on_step=None):
    """Run ``prompts`` to completion; ``on_step(sched, step)`` sees each step once it is scheduled."""
    pool = PagePool(PoolConfig(num_pages, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    swap = HostSwap(pool, host_pages) if preemption != "recompute" else None
    cache = PrefixCache(pool) if prefix else None
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=max_batched, preemption=preemption,
                      swap=swap, prefix_cache=cache, watermark=0.0)
    if preemption == "auto":
        sched.preemptor.set_prefill_rate(1e6)
    sched.preempt_log = []
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    reqs = [sched.add(i, p, m, (priorities or [0] * len(prompts))[i]) for i, (p, m) in enumerate(zip(prompts, limits))]
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        step = sched.schedule()
        assert step.requests, "nothing scheduled while requests remain: deadlock"
        sched.preempt_log += step.preempted
        if on_step is not None:
            on_step(sched, step)
        sched.update(step, toy_forward(pool, step))
        for r in list(sched.running):
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r)
        if checks:
            pool.check_integrity()
            if swap is not None:
                swap.check_integrity()
    assert all(r.status is Status.FINISHED for r in reqs)
    if swap is not None:
        swap.reclaim(wait=True)
    if cache is None:
        assert pool.num_free_pages == pool.num_pages - 1, "pages leaked"
    return [r.token_ids[r.num_prompt_tokens:] for r in reqs], sched, pool


def expected(prompts, max_tokens):
    outs = []
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for p, m in zip(prompts, limits):
        t = list(p)
        for _ in range(m):
            t.append(next_token(t))
        outs.append(t[len(p):])
    return outs


def prompts_for(seed, n=6, lo=3, hi=14):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, rng.integers(lo, hi)).tolist() for _ in range(n)]


def test_big_pool_no_preemption_matches_the_rule():
    prompts = prompts_for(0)
    outs, sched, _ = run(prompts, 10, num_pages=64)
    assert outs == expected(prompts, 10)
    assert sched.num_preemptions == {"swap": 0, "recompute": 0}


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_oversubscribed_pool_completes_with_identical_outputs(mode):
    """6 requests needing ~6 pages each share 9 usable pages: about 4x oversubscribed."""
    prompts = prompts_for(1)
    outs, sched, pool = run(prompts, 12, num_pages=10, preemption=mode)
    assert outs == expected(prompts, 12)
    assert sum(sched.num_preemptions.values()) > 0
    if mode == "swap":
        assert sched.num_preemptions["swap"] > 0 and sched.swap.num_pages_out > 0
        assert sched.swap.num_pages_in == sched.swap.num_pages_out


def test_swap_falls_back_to_recompute_when_host_is_full():
    prompts = prompts_for(2)
    outs, sched, _ = run(prompts, 12, num_pages=10, preemption="swap", host_pages=1)
    assert outs == expected(prompts, 12)
    assert sched.num_preemptions["recompute"] > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prefix_cache_hits_shorten_prefill_and_keep_outputs(mode):
    """Five prompts sharing 3 full pages need 13 pages in all, the pool has 9: requests are
    preempted in ``mode`` while they share cached pages; the outputs stay the rule's and, at the
    end, every page is free or only cached."""
    shared = list(range(1, 13))                      # 3 full pages shared by every prompt
    prompts = [shared + [20 + i, 30 + i] for i in range(5)]
    # A budget of 14 tokens computes the first prompt (14) alone, so later ones find its pages.
    outs, sched, pool = run(prompts, 6, num_pages=10, preemption=mode, prefix=True, max_batched=14)
    assert outs == expected(prompts, 6)
    assert sched.num_preemptions[mode] > 0
    assert pool.stats().num_used == 0, "pages leaked"
    hits = sched.prefix_cache.stats()
    assert hits.num_hit_tokens >= 4 * 12              # every prompt after the first reuses 3 pages


def test_prefix_cache_under_preemption_keeps_outputs():
    shared = list(range(1, 9))
    prompts = [shared + p for p in prompts_for(3, n=6, lo=1, hi=8)]
    for mode in ("swap", "recompute"):
        outs, sched, _ = run(prompts, 10, num_pages=12, preemption=mode, prefix=True)
        assert outs == expected(prompts, 10)


def test_chunked_prefill_respects_token_budget():
    prompts = [list(range(1, 40))]
    pool = PagePool(PoolConfig(32, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_batched_tokens=8, watermark=0.0)
    sched.add(0, prompts[0], 2)
    chunks = []
    while sched.has_unfinished():
        step = sched.schedule()
        assert step.num_tokens <= 8
        chunks.append(step.query_lens[0])
        sched.update(step, toy_forward(pool, step))
        for r in list(sched.running):
            if r.num_output_tokens >= 2:
                sched.finish(r)
    assert chunks == [8, 8, 8, 8, 7, 1]


def test_rows_come_decode_first_then_prefill_by_context_length():
    """A step mixing a decode row with new prompts of 9, 3 and 6 tokens packs the decode row
    first, then the prompts shortest context first (what prefill grouping relies on)."""
    pool = PagePool(PoolConfig(32, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_batched_tokens=64, watermark=0.0)
    sched.add("a", list(range(1, 6)), 4)
    step = sched.schedule()
    sched.update(step, toy_forward(pool, step))              # "a" now decodes
    for rid, n in (("b", 9), ("c", 3), ("d", 6)):
        sched.add(rid, list(range(1, n + 1)), 2)
    step = sched.schedule()
    assert [r.request_id for r in step.requests] == ["a", "c", "d", "b"]
    assert step.query_lens == [1, 3, 6, 9]


def test_lowest_priority_latest_arrival_is_preempted_first():
    prompts = [list(range(1, 8)) for _ in range(3)]
    outs, sched, _ = run(prompts, 8, num_pages=7, priorities=[0, 5, 0])
    assert outs == expected(prompts, 8)
    first = [r.request_id for r, _mode in sched.preempt_log][:1]
    assert first == [2]                              # priority 0 and latest arrival
    assert all(r.request_id != 1 for r, _ in sched.preempt_log)  # the priority-5 request never


def test_add_rejects_requests_that_can_never_fit():
    pool = PagePool(PoolConfig(4, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool)
    with pytest.raises(ValueError, match="needs 4 pages"):
        sched.add("big", list(range(10)), 5)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        sched.add("empty", [], 5)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add("zero", [1], 0)
    with pytest.raises(ValueError, match="needs a HostSwap"):
        Scheduler(pool, preemption="swap")
    with pytest.raises(ValueError, match="preemption must be one of"):
        Scheduler(pool, preemption="drop")


class _SlowCopyEvent:
    """A swap-out copy that is still running when swap_out returns, as on a GPU: done only once
    waited on, or after ``steps`` more polls."""

    def __init__(self, steps: int = 3) -> None:
        self.polls_left = steps

    @property
    def done(self) -> bool:
        self.polls_left -= 1
        return self.polls_left < 0

    def synchronize(self) -> None:
        self.polls_left = -1


@pytest.fixture
def slow_swap_copies(monkeypatch):
    import pagemem.swap as swap_mod
    init = swap_mod._Pending.__init__

    def patched(self, *a, **kw):
        init(self, *a, **kw)
        if self.direction == "out":
            self.event = _SlowCopyEvent()
    monkeypatch.setattr(swap_mod._Pending, "__init__", patched)


def test_swap_copies_in_flight_neither_stall_nor_leak(slow_swap_copies):
    prompts = prompts_for(4)
    outs, sched, pool = run(prompts, 12, num_pages=10, preemption="swap")
    assert outs == expected(prompts, 12)
    assert sched.num_preemptions["swap"] > 0


def test_swapped_request_resumes_before_new_ones_are_admitted():
    pool = PagePool(PoolConfig(9, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))        # 8 usable pages
    sched = Scheduler(pool, max_num_batched_tokens=64, preemption="swap", swap=HostSwap(pool, 64),
                      watermark=0.0)
    a, b = sched.add("A", [1] * 12, 20), sched.add("B", [2] * 12, 20)

    def step():
        st = sched.schedule()
        sched.update(st, toy_forward(pool, st))
        for r in list(sched.running):
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r)
        return st

    while b.status is not Status.SWAPPED:
        step()
    smalls = [sched.add(f"small{k}", [3], 1) for k in range(6)]   # each would fit in the leftover pages
    while b.status is Status.SWAPPED:
        st = step()
        if any(r in st.requests for r in smalls):     # only in the step that brought B back, after it
            assert b in st.resumed, "a later request overtook the swapped one"
    while sched.has_unfinished():
        step()
    assert a.status is b.status is Status.FINISHED and all(s.status is Status.FINISHED for s in smalls)


def test_resident_pages_of_swapped_requests_never_block_the_queue():
    """A swapped request keeps its shared pages resident. Here the two prompts sharing a prefix
    run beside the first; the third is swapped out, the second finishes, and the third's
    resident pages (now its alone) leave the first, running alone, one page short: without
    demoting the swapped one to recompute, the first preempts itself and nothing can resume."""
    prompts = [[90, 2, 48], [5, 5, 5, 5, 5, 27], [5, 5, 5, 5, 5, 39, 55, 74, 77]]
    outs, sched, _ = run(prompts, [15, 5, 9], num_pages=6, preemption="swap", prefix=True, max_batched=3)
    assert outs == expected(prompts, [15, 5, 9])
    assert sched.num_preemptions["swap"] > 0


def test_tight_pools_with_shared_prefixes_always_complete():
    """Random ragged workloads on a pool that fits only the largest request: swap preemption with
    prefix sharing, small token budgets. Every request completes with the rule's tokens."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        shared = [5] * int(rng.integers(4, 12))
        prompts = [(shared if rng.random() < 0.6 else []) + rng.integers(0, VOCAB, rng.integers(1, 6)).tolist()
                   for _ in range(rng.integers(2, 5))]
        limits = rng.integers(1, 16, len(prompts)).tolist()
        need = max(-(-(len(p) + m) // PAGE_SIZE) for p, m in zip(prompts, limits))
        mode = ["swap", "auto"][int(rng.integers(2))]
        outs, _, _ = run(prompts, limits, num_pages=need + 1 + int(rng.integers(0, 3)), preemption=mode,
                         prefix=True, max_batched=int(rng.integers(1, 8)))
        assert outs == expected(prompts, limits), (prompts, limits)


def test_blocked_admission_leaves_prefix_cache_untouched():
    pool = PagePool(PoolConfig(7, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))        # 6 usable pages
    cache = PrefixCache(pool)
    sched = Scheduler(pool, max_num_batched_tokens=64, prefix_cache=cache, watermark=0.0)
    first = sched.add(0, list(range(1, 10)), 1)
    st = sched.schedule()
    sched.update(st, toy_forward(pool, st))
    sched.finish(first)                                              # 2 pages cached, evictable
    hog = sched.add(1, [50] * 9, 4)                                  # 3 pages, no growth for 3 steps
    st = sched.schedule()
    sched.update(st, toy_forward(pool, st))
    late = sched.add(2, list(range(1, 10)) + [7] * 8, 3)            # hits 2 pages, needs 3 more: 1 free
    def observed():
        return cache.stats().num_queries, cache.stats().num_hit_tokens, list(pool.policy._order)

    before = observed()
    for _ in range(3):
        st = sched.schedule()
        assert late not in st.requests
        sched.update(st, toy_forward(pool, st))
    assert observed() == before                  # no query counted, no cached page moved
    assert hog.status is Status.RUNNING


def test_bad_scheduler_arguments_are_named():
    pool = PagePool(PoolConfig(8, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    with pytest.raises(ValueError, match="watermark"):
        Scheduler(pool, watermark=-0.1)
    with pytest.raises(TypeError, match="max_num_seqs"):
        Scheduler(pool, max_num_seqs=2.5)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(pool, max_num_batched_tokens=0)
    with pytest.raises(TypeError, match="priority"):
        Scheduler(pool).add(0, [1], 1, priority=None)


def test_admit_batch_admits_in_batches_and_completes():
    prompts = prompts_for(5, n=10)
    pool = PagePool(PoolConfig(64, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0, admit_batch=3)
    reqs = [sched.add(i, p, 5 + i) for i, p in enumerate(prompts)]
    admitted_per_step = []
    while sched.has_unfinished():
        before = {r for r in reqs if r.status is Status.WAITING}
        st = sched.schedule()
        admitted_per_step.append(len(before & set(st.requests)))
        sched.update(st, toy_forward(pool, st))
        for r in list(sched.running):
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r)
    assert [r.token_ids[r.num_prompt_tokens:] for r in reqs] == \
        [e[:5 + i] for i, e in enumerate(expected(prompts, 14))]
    later = [n for n in admitted_per_step[1:] if n]   # admissions while others run
    assert later and all(n >= 3 for n in later[:-1])   # in threes; the last may be the remainder


# ---- advance / resolve: the next step scheduled before this one's tokens are known ------------
STOP = 0       # the lagged driver's stop token: a request ends on it (after max_tokens otherwise)


def expected_with_stop(prompts, max_tokens):
    outs = []
    for p in prompts:
        t = list(p)
        while len(t) - len(p) < max_tokens:
            t.append(next_token(t))
            if t[-1] % 7 == STOP:
                break
        outs.append(t[len(p):])
    return outs


def run_lagged(prompts, max_tokens, num_pages, preemption="recompute", prefix=False, max_batched=16):
    """Drive the scheduler one step ahead, as an engine with asynchronous sampling does: each
    step is scheduled and advanced while the previous step's ids are still unknown to it; the
    driver feeds them to the toy model itself and reports them one step late with resolve().
    A request whose id is a stop token has already run one more row, whose id is dropped."""
    pool = PagePool(PoolConfig(num_pages, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    swap = HostSwap(pool, 64) if preemption != "recompute" else None
    cache = PrefixCache(pool) if prefix else None
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=max_batched, preemption=preemption,
                      swap=swap, prefix_cache=cache, watermark=0.0)
    if preemption == "auto":
        sched.preemptor.set_prefill_rate(1e6)
    reqs = [sched.add(i, p, max_tokens) for i, p in enumerate(prompts)]
    prev: dict = {}                       # the previous step's sampled ids, not yet resolved
    stopped: set = set()
    lag_seen = 0
    for _ in range(10_000):
        for r in prev:                    # its in-flight id is its last: retire before scheduling
            if r.status is Status.RUNNING and r.num_output_tokens >= max_tokens:
                sched.finish(r)
        if not sched.has_unfinished() and not prev:
            break
        cur: dict = {}
        step = sched.schedule() if sched.has_unfinished() else None
        if step is not None and step.requests:
            assert all(q == 1 for r, q in zip(step.requests, step.query_lens) if r.num_pending)
            lag_seen += sum(1 for r in step.requests if r.num_pending)
            k, _ = pool.layer_kv(0)
            for r, n in zip(step.requests, step.query_lens):
                new = r.token_ids[r.num_computed:r.num_computed + n] if not r.num_pending else [prev[r]]
                s = r.pages.slots(r.pages.num_tokens - n, r.pages.num_tokens)
                k[s // PAGE_SIZE, s % PAGE_SIZE, 0, 0] = new
            for r in step.requests:
                if r.pages.num_tokens == r.num_tokens:
                    s = r.pages.slots(0, r.num_tokens)
                    cur[r] = next_token(k[s // PAGE_SIZE, s % PAGE_SIZE, 0, 0].astype(np.int64))
            sched.advance(step, list(cur))
        else:
            assert prev, "nothing scheduled and nothing in flight: deadlock"
        keep = {r: t for r, t in prev.items() if r not in stopped}
        for r in prev:
            if r in stopped:
                r.num_pending -= 1        # the extra row's id: dropped
        sched.resolve(keep)
        for r, t in keep.items():
            if t % 7 == STOP:
                stopped.add(r)
                if r.status is not Status.FINISHED:
                    sched.finish(r)
            elif r.num_output_tokens - r.num_pending >= max_tokens and r.status is not Status.FINISHED:
                sched.finish(r)
        prev = cur
        pool.check_integrity()
        if swap is not None:
            swap.check_integrity()
    assert all(r.status is Status.FINISHED and r.num_pending == 0 for r in reqs)
    if swap is not None:
        swap.reclaim(wait=True)
    if cache is None:
        assert pool.num_free_pages == pool.num_pages - 1, "pages leaked"
    return [r.token_ids[r.num_prompt_tokens:] for r in reqs], sched, lag_seen


@pytest.mark.parametrize("mode,prefix", [("recompute", False), ("swap", False), ("auto", False),
                                         ("recompute", True), ("swap", True)])
def test_lagged_driver_gives_identical_outputs(mode, prefix):
    """About 4x oversubscribed, stop tokens included: every id, preemption and prefix hit comes
    out as with the synchronous rule, though each step was scheduled a step early."""
    shared = [5, 9, 14, 3, 8, 1, 2, 6]
    prompts = [(shared if i % 2 else []) + p for i, p in enumerate(prompts_for(6, n=8))]
    outs, sched, lag_seen = run_lagged(prompts, 14, num_pages=12, preemption=mode, prefix=prefix)
    want = expected_with_stop(prompts, 14)
    assert outs == want
    assert any(len(o) < 14 for o in want) and any(len(o) == 14 for o in want)   # both ways of stopping
    assert lag_seen > 0 and sum(sched.num_preemptions.values()) > 0


def test_dropped_pending_tokens_leave_the_count():
    """An id that will never be reported (its request stopped while the row ran) is dropped: the
    count goes back, the known ids stay, and a request with nothing pending is passed over."""
    pool = PagePool(PoolConfig(16, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_batched_tokens=64, watermark=0.0)
    a, b = sched.add("a", [1, 2, 3], 5), sched.add("b", [4], 5)
    st = sched.schedule()
    sched.advance(st, [a, b])
    sched.advance(sched.schedule(), [a])               # a: two ids in flight, b: one
    sched.drop_pending([a, b, b])                      # b's second entry has nothing left: passed over
    assert (a.num_pending, b.num_pending, a.num_tokens, b.num_tokens) == (1, 0, 4, 1)
    sched.resolve({a: 9})
    assert a.token_ids == [1, 2, 3, 9] and a.num_pending == 0
    with pytest.raises(ValueError, match="no pending token"):
        sched.resolve({b: 1})


def test_pending_tokens_count_and_wait_for_admission():
    """A request with a pending id counts it in num_tokens and decodes it next step; preempted by
    recompute meanwhile, it is not admitted again until the id is resolved."""
    pool = PagePool(PoolConfig(16, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_batched_tokens=64, watermark=0.0)
    a = sched.add("a", [1, 2, 3], 5)
    st = sched.schedule()
    sched.advance(st, [a])
    assert (a.num_tokens, a.num_computed, len(a.token_ids), a.num_pending) == (4, 3, 3, 1)
    st = sched.schedule()
    assert st.requests == [a] and st.query_lens == [1] and a.pages.num_tokens == 4
    sched.advance(st, [a])                             # two ids in flight now
    assert a.num_tokens == 5 and a.num_output_tokens == 2
    sched._preempt(a)                                  # recompute: back to waiting, pages freed
    assert a.status is Status.WAITING
    assert not sched.schedule().requests               # its ids are not known: it waits
    sched.resolve({a: 40})
    assert not sched.schedule().requests
    sched.resolve({a: 41})
    st = sched.schedule()
    assert st.requests == [a] and st.query_lens == [5] and a.token_ids == [1, 2, 3, 40, 41]
    with pytest.raises(ValueError, match="no pending token"):
        sched.resolve({a: 1})
    sched.advance(st, [])
    sched.finish(a)
    with pytest.raises(ValueError, match="not running"):
        sched.advance(st, [])
    assert pool.num_free_pages == pool.num_pages - 1


def test_finish_retires_waiting_and_swapped_requests():
    pool = PagePool(PoolConfig(16, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    swap = HostSwap(pool, 16)
    sched = Scheduler(pool, max_num_batched_tokens=64, preemption="swap", swap=swap, watermark=0.0)
    a, b = sched.add("a", [1] * 9, 4), sched.add("b", [2] * 5, 4)
    st = sched.schedule()
    sched.update(st, toy_forward(pool, st))
    sched._preempt(a)
    assert a.status is Status.SWAPPED and swap.num_free_host_pages < 16
    sched.finish(a)
    sched.finish(b)
    c = sched.add("c", [3], 1)
    sched.finish(c)
    assert not sched.has_unfinished() and all(r.status is Status.FINISHED for r in (a, b, c))
    swap.reclaim(wait=True)
    swap.check_integrity()
    assert swap.num_free_host_pages == 16 and pool.num_free_pages == pool.num_pages - 1


# ---- demotion and the lagged resume: paths reached by hand-built states ----------------------------
def _tight(num_usable: int, budget: int, prefix: bool = True):
    pool = PagePool(PoolConfig(num_usable + 1, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    sched = Scheduler(pool, max_num_batched_tokens=budget, preemption="swap", swap=HostSwap(pool, 64),
                      prefix_cache=PrefixCache(pool) if prefix else None, watermark=0.0)

    def step():
        st = sched.schedule()
        sched.update(st, toy_forward(pool, st))
        for r in list(sched.running):
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r)
        pool.check_integrity()
        return st
    return pool, sched, step


def test_first_in_line_to_resume_while_nothing_runs_demotes_a_less_important_one():
    """7 pages, budget 9. Z (priority 2) and L (0) share the prefix Q (pages 1, 2). H (1), a
    23-token prompt, prefills in chunks: its second chunk swaps L out (L's own page to the host,
    Q resident). Z's next page then swaps H out mid-prefill (4 pages). Z finishes: nothing runs,
    H, first in line, needs its 4 pages and 2 for its next 8 tokens, 6 of the 5 free (L keeps Q):
    L is demoted to recompute, its host copy dropped, and H resumes."""
    pool, sched, step = _tight(7, 9)
    q = list(range(1, 9))
    z = sched.add("Z", q + [50], 6, priority=2)
    step()
    lo = sched.add("L", q + [70], 4, priority=0)
    step()
    h = sched.add("H", [60] * 23, 1, priority=1)
    step()
    assert step().preempted == [(lo, "swap")] and lo.preempted.page_table == [1, 2, 0]
    assert step().preempted == [(h, "swap")] and h.num_computed == 15
    step()                                                    # Z's last token: it finishes
    assert z.status is Status.FINISHED and not sched.running and sched.swapped == [h, lo]
    assert pool.num_free_pages == 5 and sched.swap.num_free_host_pages == 64 - 5
    st = step()
    assert st.resumed == [h] and st.requests == [h] and st.query_lens == [8]
    assert lo.status is Status.WAITING and lo.preempted is None and lo.num_computed == 0
    assert (lo.num_demotions, sched.num_demotions) == (1, 1)
    assert lo.num_preemptions == 1 and sched.num_preemptions == {"swap": 1, "recompute": 1}
    assert sched.swap.num_free_host_pages == 64           # L's copy dropped, H's swapped in (and reclaimed)
    while sched.has_unfinished():
        step()
    assert [r.token_ids[r.num_prompt_tokens:] for r in (z, lo, h)] == expected([q + [50], q + [70], [60] * 23], [6, 4, 1])


def test_demotion_never_takes_a_more_important_swapped_request():
    """Every swapped request is less important than every running one in the scheduler's own flow
    (victims are always the least important), so here the more important Y is preempted by hand.
    6 pages, budget 6: Y (priority 1) prefills in chunks, C (1) reuses its first page, A (0) is a
    16-token prompt. Y swapped out keeps page 1 (shared with C) resident. A's next chunk needs two
    pages, one is free, and C, more important, runs: the search for a request to demote stops at
    Y, which keeps its host copy and resident page, and A preempts itself."""
    pool, sched, step = _tight(6, 6)
    q = list(range(1, 9))
    y = sched.add("Y", q + [3], 4, priority=1)
    step()
    c, a = sched.add("C", q + [5], 4, priority=1), sched.add("A", [20] * 16, 4, priority=0)
    step()
    step()
    sched._preempt(y)
    record = y.preempted
    assert y.status is Status.SWAPPED and record.resident == [1] and pool.refcount(1) == 2
    st = step()
    assert st.requests == [c, a] and st.query_lens == [1, 5] and pool.num_free_pages == 1
    st = step()
    assert st.preempted == [(a, "swap")] and st.requests == [c]
    assert y.status is Status.SWAPPED and y.preempted is record and not record.spent
    assert sched.num_demotions == 0 and pool.refcount(1) == 2     # Y's resident reference and C's
    while sched.has_unfinished():
        step()
    assert [r.token_ids[r.num_prompt_tokens:] for r in (y, c, a)] == \
        expected([q + [3], q + [5], [20] * 16], [4, 4, 4])


def test_a_swapped_request_with_an_id_in_flight_resumes_only_once_it_is_known():
    """Two pages. B (priority 1) and A each take one; both sample, ids not reported yet (advance).
    B's next token needs a page: A is swapped out with its id in flight. B is retired; two pages
    are free, yet A stays swapped until its id is resolved, then resumes decoding it."""
    pool, sched, _ = _tight(2, 16, prefix=False)
    b, a = sched.add("B", [1, 2, 3, 4], 3, priority=1), sched.add("A", [5, 6, 7], 3)
    st = sched.schedule()
    sched.advance(st, [b, a])
    st = sched.schedule()
    assert st.preempted == [(a, "swap")] and st.requests == [b] and a.num_pending == 1
    sched.advance(st, [b])
    sched.resolve({b: 11})
    sched.finish(b)
    assert pool.num_free_pages == 2
    st = sched.schedule()
    assert st.requests == [] and st.resumed == [] and a.status is Status.SWAPPED
    sched.resolve({a: 12})
    st = sched.schedule()
    assert st.resumed == [a] and st.requests == [a] and st.query_lens == [1]
    assert a.token_ids == [5, 6, 7, 12] and a.pages.num_tokens == 4
