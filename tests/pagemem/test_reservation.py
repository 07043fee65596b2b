"""Reservation allocators: sizes, the first-fit arena, and each part of the memory account on
runs small enough to follow by hand (decode 1 s a step, prefill 1 token/s, no overhead)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pagemem.reservation import (ContiguousArena, MemoryAccount, paged_account, reservation_tokens,
                                 simulate_reservation)
from pagemem.simulator import SimConfig, SimStep, Simulator, StepModel
from pagemem.traces import TraceRequest, synthetic_trace

MODEL = StepModel((1,), (1,), ((1.0,),), 1.0, 0.0, 1.0, 1.0, 1)


def test_reservation_sizes():
    assert reservation_tokens("max", 499, 2048) == 2048
    assert [reservation_tokens("pow2", n, 2048) for n in (1, 2, 3, 499, 512, 513)] == [1, 2, 4, 512, 512, 1024]
    assert reservation_tokens("pow2", 1500, 2000) == 2000          # at most the model's length
    assert reservation_tokens("exact", 499, 2048) == 499
    for args, message in [(("pow2", 0, 8), "final_len"), (("exact", 9, 8), "final_len"), (("buddy", 4, 8), "policy")]:
        with pytest.raises(ValueError, match=message):
            reservation_tokens(*args)


def test_arena_is_first_fit_and_merges_holes():
    arena = ContiguousArena(10)
    assert [arena.allocate(4), arena.allocate(3), arena.allocate(3)] == [0, 4, 7]
    assert arena.allocate(1) is None and arena.holes == []
    arena.free(4, 3)                                   # [0,4) used | [4,7) free | [7,10) used
    assert arena.allocate(4) is None and arena.holes == [(4, 3)]
    arena.free(0, 4)                                   # merges with [4,7)
    assert arena.holes == [(0, 7)] and arena.free_tokens == 7 and arena.largest_hole == 7
    assert arena.allocate(5) == 0 and arena.holes == [(5, 2)]
    arena.free(7, 3)                                   # merges with [5,7) on its left
    assert arena.holes == [(5, 5)]
    for start, n in [(6, 2), (0, 11), (-1, 1), (2, 0)]:
        with pytest.raises(ValueError, match="free"):
            arena.free(start, n)
        assert arena.holes == [(5, 5)]                 # a failed call changes nothing
    arena.free(0, 5)
    assert arena.holes == [(0, 10)]


def test_account_weights_each_part_by_time():
    acct = MemoryAccount(10)
    acct.add(2.0, token_states=4, reservation=2, internal=1, external=3)
    acct.add(1.0, token_states=7, reservation=0, internal=3, external=0)
    assert acct.shares() == pytest.approx({"token_states": 15 / 30, "reservation": 4 / 30, "internal": 5 / 30,
                                           "external": 6 / 30, "unused": 0.0})
    assert acct.token_share_of_reserved() == pytest.approx(15 / 24)
    with pytest.raises(RuntimeError, match="do not fit 10"):
        acct.add(1.0, 8, 2, 1, 0)
    assert math.isnan(MemoryAccount(4).token_share_of_reserved())


def test_max_reservation_by_hand():
    """8 slots, two requests of prompt 2 + output 2, each reserving all 8 ('max' of 8). Step 1:
    A prefills (2 s) while B waits: A holds 2 tokens, 2 slots for its coming tokens, 4 it never
    uses. Step 2: A decodes (1 s): 3, 1, 4. Then B runs alone (3 s), nobody waiting."""
    trace = [TraceRequest(0.0, 2, 2), TraceRequest(0.0, 2, 2)]
    r = simulate_reservation(trace, MODEL, "max", 8, max_len=8)
    assert r.shares == pytest.approx({"token_states": 7 / 24, "reservation": 5 / 24, "internal": 12 / 24,
                                      "external": 0.0, "unused": 0.0})
    assert r.token_share_of_reserved == pytest.approx(7 / 24)
    assert (r.peak_batch, r.elapsed_s, r.loaded_s) == (1, 6.0, 3.0)
    assert r.output_tokens_per_s == pytest.approx(4 / 6) and r.requests_per_s == pytest.approx(2 / 6)


def test_exact_reservation_runs_both_at_once_and_is_never_loaded():
    r = simulate_reservation([TraceRequest(0.0, 2, 2), TraceRequest(0.0, 2, 2)], MODEL, "exact", 8, max_len=8)
    assert (r.peak_batch, r.elapsed_s, r.loaded_s) == (2, 5.0, 0.0)     # prefill 4 s, one decode
    assert math.isnan(r.token_share_of_reserved) and r.output_tokens_per_s == pytest.approx(4 / 5)


def test_external_fragmentation_by_hand():
    """11 slots, exact reservations: A 4 at [0,4), B 2 at [4,6), C 4 at [6,10); D needs 3 and
    waits. Step 1 (5 s of prefill): 1 slot free, refused. B ends; step 2 (one decode, 1 s): free
    [4,6) and [10,11), 3 slots, as many as D needs but not in one run: external fragmentation."""
    trace = [TraceRequest(0.0, 2, 2), TraceRequest(0.0, 1, 1), TraceRequest(0.0, 2, 2), TraceRequest(0.0, 2, 1)]
    r = simulate_reservation(trace, MODEL, "exact", 11, max_len=8)
    # slot-seconds over 6 s x 11 slots: tokens 5x5 + 6x1, coming tokens 5x5 + 2x1, free 1x5 + 3x1
    assert r.shares == pytest.approx({"token_states": 31 / 66, "reservation": 27 / 66, "internal": 0.0,
                                      "external": 8 / 66, "unused": 0.0})
    assert r.token_share_of_reserved == pytest.approx(31 / 58)
    assert (r.peak_batch, r.elapsed_s, r.loaded_s) == (3, 8.0, 6.0)
    assert r.output_tokens_per_s == pytest.approx(6 / 8)


def test_a_reservation_larger_than_memory_is_refused():
    with pytest.raises(ValueError, match=r"trace\[0\] reserves 16 slots under 'pow2'; the memory holds 12"):
        simulate_reservation([TraceRequest(0.0, 9, 2)], MODEL, "pow2", 12, max_len=16)


def test_paged_account_by_hand():
    """Two steps of a pool of 4 usable pages of 4 slots: 2 s with 3 pages and 10 tokens while a
    request waits, then 1 s with nobody waiting (not counted)."""
    def step(seconds, used, tokens, waiting):
        return SimStep(0.0, seconds, 1, 1, 0, used, 0.0, tokens, 0, 2, waiting, 0, 0, 0)
    result = SimpleNamespace(config=SimConfig(5, 4), steps=[step(2.0, 3, 10, 1), step(1.0, 2, 5, 0)],
                             outputs=[SimpleNamespace(num_output_tokens=6)], elapsed_s=3.0)
    r = paged_account(result)
    assert r.shares == pytest.approx({"token_states": 20 / 32, "reservation": 0.0, "internal": 4 / 32,
                                      "external": 0.0, "unused": 8 / 32})
    assert r.token_share_of_reserved == pytest.approx(10 / 12) and r.output_tokens_per_s == pytest.approx(2.0)


def test_pages_of_one_token_hold_nothing_but_token_states():
    """page_size 1 and no prefix sharing: every held slot holds a token (the share is exactly 1)."""
    trace = synthetic_trace(300, "alpaca", seed=1)
    result = Simulator(trace, MODEL, SimConfig(1025, 1, preemption="recompute", swap_space=0)).run()
    r = paged_account(result)
    assert r.loaded_s > 0 and r.token_share_of_reserved == 1.0 and r.shares["internal"] == 0.0
