"""The scheduler gathers a step's swaps: every request it swaps out in one step goes to the host
in one HostSwap copy, every request it resumes in one step comes back in one copy; the toy model
of test_scheduler (next token from every cached K) shows any page lost or mixed up."""
from __future__ import annotations

import numpy as np
import pytest
from test_scheduler import PAGE_SIZE, expected, prompts_for, run, toy_forward

from pagemem import PagePool, PoolConfig
from pagemem.scheduler import Scheduler, Status
from pagemem.swap import HostSwap


@pytest.fixture
def plans(monkeypatch):
    """(direction, pages) of every copy plan HostSwap makes, in order."""
    import pagemem.swap as swap_module
    made, real = [], swap_module.plan_copies

    def recording(ids, slots, *rest):
        made.append(len(ids))
        return real(ids, slots, *rest)
    monkeypatch.setattr(swap_module, "plan_copies", recording)
    return made


def four_requests():
    """Four 8-token prompts (two full pages each) in a pool of 8 usable pages, swap preemption."""
    pool = PagePool(PoolConfig(9, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
    swap = HostSwap(pool, 16)
    sched = Scheduler(pool, max_num_batched_tokens=64, preemption="swap", swap=swap, watermark=0.0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, 8).tolist() for _ in range(4)]
    reqs = [sched.add(name, p, m) for name, p, m in zip("ABCD", prompts, [3, 3, 6, 6])]
    return pool, swap, sched, reqs, prompts


def step(sched, pool):
    st = sched.schedule()
    sched.update(st, toy_forward(pool, st))
    for r in list(sched.running):
        if r.num_output_tokens >= r.max_tokens:
            sched.finish(r)
    return st


def assert_holds_its_tokens(pool, req) -> None:
    """Each computed token's K is its id (toy_forward stores it so)."""
    k, _ = pool.layer_kv(0)
    s = req.pages.slots(0, req.num_computed)
    assert k[s // PAGE_SIZE, s % PAGE_SIZE, 0, 0].astype(int).tolist() == req.token_ids[:req.num_computed]


def test_one_step_preempting_two_requests_swaps_them_out_in_one_call(plans):
    """Step 2: all four need a third page; A takes D's pages, B the rest, C then preempts itself:
    two swap preemptions, one swap-out copy of their 4 pages. Once A and B finish, C and D resume in
    one step, one swap-in copy of 4 pages, each holding exactly its own tokens."""
    pool, swap, sched, (a, b, c, d), prompts = four_requests()
    step(sched, pool)
    plans.clear()
    st = step(sched, pool)
    assert st.preempted == [(d, "swap"), (c, "swap")] and st.requests == [a, b]
    assert swap.num_calls == {"out": 1, "in": 0} and plans == [4]
    while not st.resumed:
        st = step(sched, pool)
    assert st.resumed == [c, d] and swap.num_calls == {"out": 1, "in": 1} and plans[-1] == 4
    for r in (c, d):
        assert_holds_its_tokens(pool, r)
    while sched.has_unfinished():
        step(sched, pool)
    assert [r.token_ids[r.num_prompt_tokens:] for r in (a, b, c, d)] == expected(prompts, [3, 3, 6, 6])
    pool.check_integrity()
    swap.check_integrity()


def test_every_step_makes_at_most_one_copy_a_direction_covering_its_swaps():
    """Random prompts in tight pools: a step's swap-out copy covers exactly the exclusive pages of
    the requests it swapped out (host slots taken in the step), its swap-in copy those it resumed;
    outputs are the rule's."""
    seen_multi = False
    for seed in range(6):
        prompts = prompts_for(seed, n=8)
        pool = PagePool(PoolConfig(10, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))
        swap = HostSwap(pool, 64)
        sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=16, preemption="swap", swap=swap,
                          watermark=0.0)
        reqs = [sched.add(i, p, 10) for i, p in enumerate(prompts)]
        while sched.has_unfinished():
            calls, out0, in0 = dict(swap.num_calls), swap.num_pages_out, swap.num_pages_in
            st = step(sched, pool)
            swapped = [r for r, m in st.preempted if m == "swap"]
            assert swap.num_calls["out"] - calls["out"] == (swap.num_pages_out > out0)
            assert swap.num_calls["in"] - calls["in"] == (swap.num_pages_in > in0) == bool(st.resumed)
            assert swap.num_pages_out - out0 == sum(len(r.preempted.swapped_at) for r in swapped
                                                    if r.status is Status.SWAPPED)
            seen_multi |= len(swapped) > 1 or len(st.resumed) > 1
        assert [r.token_ids[r.num_prompt_tokens:] for r in reqs] == expected(prompts, 10)
    assert seen_multi, "no step swapped several requests: the test proves nothing"


def test_copy_on_write_after_a_deferred_swap_out_copies_it_first():
    """B's last page is partial and shared (an outside reference, as after a fork), so its next
    token copies the page first. The pool is full: A takes the last free page, B preempts C by
    swap and its copy-on-write lands in one of C's freed pages. C's host copy must hold C's
    tokens: the deferred swap-out is copied before the copy-on-write writes that page."""
    pool = PagePool(PoolConfig(8, PAGE_SIZE, 1, 1, 1, "float32", "cpu"))     # 7 usable pages
    swap = HostSwap(pool, 16)
    sched = Scheduler(pool, max_num_batched_tokens=64, preemption="swap", swap=swap, watermark=0.0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, n).tolist() for n in (8, 6, 8)]
    a, b, c = (sched.add(name, p, 6, prio) for name, p, prio in zip("ABC", prompts, (2, 1, 0)))
    step(sched, pool)                                   # 6 pages in use; B's last page holds 3 of 4 tokens
    shared = b.pages.page_table[-1]
    pool.share([shared])
    st = step(sched, pool)
    assert st.preempted == [(c, "swap")] and b.pages.page_table[-1] != shared
    k = swap.host[:, 0, 0, :, 0, 0]                     # [host slot, offset]: the K each slot holds
    got = k[c.preempted.ticket.host_slots].reshape(-1).astype(int).tolist()
    assert got == c.token_ids[:8], "C's host copy was overwritten before it was taken"
    pool.free([shared])
    while sched.has_unfinished():
        step(sched, pool)
    assert [r.token_ids[r.num_prompt_tokens:] for r in (a, b, c)] == expected(prompts, 6)


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_tight_pools_complete_with_the_rules_tokens_under_batched_swaps(mode):
    """The oversubscribed runs of test_scheduler with a host pool that never runs out: the outputs
    are the rule's, and no step made more than one copy a direction, though some step swapped out
    two requests and some step resumed two."""
    prompts = prompts_for(24, n=8)
    seen, last = [], {"out": 0, "in": 0}   # per step: (copies out, copies in, swapped out, resumed)

    def record(sched, st):
        now = dict(sched.swap.num_calls)
        seen.append((now["out"] - last["out"], now["in"] - last["in"],
                     sum(m == "swap" for _, m in st.preempted), len(st.resumed)))
        last.update(now)
    outs, sched, pool = run(prompts, 12, num_pages=9, preemption=mode, host_pages=64, on_step=record)
    assert outs == expected(prompts, 12)
    assert sched.num_preemptions["swap"] > 0
    if mode == "swap":
        assert sched.num_preemptions["recompute"] == 0
    for n_out, n_in, swapped, resumed in seen:
        assert n_out == (swapped > 0) and n_in == (resumed > 0), (n_out, n_in, swapped, resumed)
    assert max(s[2] for s in seen) >= 2, "no step swapped out several requests: the test proves nothing"
    assert max(s[3] for s in seen) >= 2, "no step resumed several requests: the test proves nothing"
