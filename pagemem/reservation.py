"""Reservation allocators beside the paged pool: contiguous K/V memory per request, the way the
PagedAttention paper's baselines keep it (Kwon et al., SOSP 2023, §3 and Fig. 2: Orca with a
reservation of the maximum length, of the next power of two, and of the exact final length).

A request is admitted only when one contiguous run of slots of its reservation is free
(first fit over ``[0, capacity)``), keeps it to the end and never grows or is preempted. Slots of
a running request are then, at any moment:

    token states   tokens whose K/V are in the cache
    reservation    slots its later tokens will fill (used, but not yet)
    internal       slots past its final length (never used: over-reservation)

and the rest of memory is free: ``external`` fragmentation while a waiting request is refused
for lack of a contiguous run, ``unused`` otherwise. ``paged_account`` reads the same shares off a
Simulator run of the paged pool (its internal fragmentation is the empty slots of last pages;
it has no reservation and, as any page serves any request, no external fragmentation).
Shares are time-weighted by step seconds over the steps during which some request waits: the
system under load, as the paper measures it.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from pagemem.simulator import SimResult, StepModel
from pagemem.traces import TraceRequest

POLICIES = ("max", "pow2", "exact")
PART_NAMES = ("token_states", "reservation", "internal", "external", "unused")


def reservation_tokens(policy: str, final_len: int, max_len: int) -> int:
    """Slots reserved for a request of ``final_len`` tokens (prompt + output) under ``policy``:
    "max" the model's ``max_len``, "pow2" the next power of two of final_len (at most max_len),
    "exact" final_len itself (an oracle that knows the output length)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not 1 <= final_len <= max_len:
        raise ValueError(f"final_len must be in [1, max_len={max_len}], got {final_len}")
    if policy == "max":
        return max_len
    if policy == "pow2":
        return min(1 << (final_len - 1).bit_length(), max_len)
    return final_len


class ContiguousArena:
    """First-fit allocation of contiguous runs of slots in ``[0, capacity)``.

    Owns the free runs (holes): a list of ``[start, length]`` sorted by start, adjacent holes
    merged on free. A failed call changes nothing.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._starts: list[int] = [0]         # [num_holes] starts, increasing
        self._lengths: list[int] = [capacity]  # [num_holes]

    @property
    def free_tokens(self) -> int:
        return sum(self._lengths)

    @property
    def largest_hole(self) -> int:
        return max(self._lengths, default=0)

    @property
    def holes(self) -> list[tuple[int, int]]:
        """(start, length) of each free run, in address order."""
        return list(zip(self._starts, self._lengths))

    def allocate(self, n: int) -> int | None:
        """The start of a run of ``n`` slots taken from the lowest hole that fits, or None."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        for i, length in enumerate(self._lengths):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i], self._lengths[i] = start + n, length - n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        """Give back slots ``[start, start + n)``, which must all be allocated (ValueError otherwise)."""
        if not (isinstance(start, int) and isinstance(n, int) and n >= 1 and 0 <= start and start + n <= self.capacity):
            raise ValueError(f"free: [{start}, {start}+{n}) is not a run inside [0, {self.capacity})")
        i = bisect.bisect_left(self._starts, start)
        prev_end = self._starts[i - 1] + self._lengths[i - 1] if i else 0
        if (i and prev_end > start) or (i < len(self._starts) and self._starts[i] < start + n):
            raise ValueError(f"free: [{start}, {start + n}) overlaps a free run: double free")
        merge_prev = i > 0 and prev_end == start
        merge_next = i < len(self._starts) and self._starts[i] == start + n
        if merge_prev and merge_next:
            self._lengths[i - 1] += n + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += n
        elif merge_next:
            self._starts[i], self._lengths[i] = start, self._lengths[i] + n
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, n)


class MemoryAccount:
    """Time-weighted slot counts of each part (``PART_NAMES``) over the steps added."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.totals = dict.fromkeys(PART_NAMES, 0.0)    # slot-seconds
        self.seconds = 0.0

    def add(self, seconds: float, token_states: int, reservation: int, internal: int, external: int) -> None:
        used = token_states + reservation + internal
        if used + external > self.capacity or min(token_states, reservation, internal, external) < 0:
            raise RuntimeError(f"memory account: {token_states} + {reservation} + {internal} + {external} "
                               f"slots do not fit {self.capacity}")
        parts = (token_states, reservation, internal, external, self.capacity - used - external)
        for name, slots in zip(PART_NAMES, parts):
            self.totals[name] += seconds * slots
        self.seconds += seconds

    def shares(self) -> dict[str, float]:
        """Each part's share of the whole K/V memory (they sum to 1); NaN when nothing was added."""
        whole = self.capacity * self.seconds
        return {k: v / whole if whole else math.nan for k, v in self.totals.items()}

    def token_share_of_reserved(self) -> float:
        """The share of reserved (allocated) slots that hold token states."""
        held = self.totals["token_states"] + self.totals["reservation"] + self.totals["internal"]
        return self.totals["token_states"] / held if held else math.nan


class AllocatorReport(NamedTuple):
    allocator: str
    token_share_of_reserved: float
    shares: dict[str, float]         # PART_NAMES -> share of the whole K/V memory, under load
    peak_batch: int
    output_tokens_per_s: float
    requests_per_s: float
    elapsed_s: float
    loaded_s: float                  # simulated seconds during which a request waited


@dataclass(slots=True, eq=False)
class _Seq:
    prompt_len: int
    output_len: int
    start: int
    size: int
    computed: int = 0        # tokens whose K/V are cached
    produced: int = 0        # output tokens sampled


def simulate_reservation(trace: Sequence[TraceRequest], step_model: StepModel, policy: str, capacity: int, *,
                         max_len: int = 2048, max_num_seqs: int = 256,
                         max_num_batched_tokens: int = 2048) -> AllocatorReport:
    """Serve ``trace`` with contiguous reservations of ``policy`` in ``capacity`` slots, first come
    first served, timed by ``step_model`` like the paged Simulator: running requests first
    (prefill chunks within the token budget, then one decode token each), then admission while
    the head of the queue finds a contiguous run. Raises ValueError, before any step, for a
    request whose reservation exceeds ``capacity``."""
    run = _ReservationRun(trace, policy, capacity, max_len, max_num_seqs, max_num_batched_tokens)
    while run.num_done < len(trace):
        run.arrive()
        rows, num_decode, decode_ctx, prefill = run.rows()
        seconds = step_model.step_seconds(num_decode, decode_ctx, prefill)
        run.finish_step(rows, seconds)
    clock = run.clock
    return AllocatorReport(policy, run.acct.token_share_of_reserved(), run.acct.shares(), run.peak,
                           run.out_tokens / clock, len(trace) / clock, clock, run.acct.seconds)


class _ReservationRun:
    """The state of one reservation run: the arena, the queues, the clock and the account."""

    def __init__(self, trace, policy: str, capacity: int, max_len: int, max_num_seqs: int, budget: int) -> None:
        self.sizes = [reservation_tokens(policy, r.prompt_len + r.output_len, max_len) for r in trace]
        if max(self.sizes) > capacity:
            i = self.sizes.index(max(self.sizes))
            raise ValueError(f"trace[{i}] reserves {self.sizes[i]} slots under {policy!r}; "
                             f"the memory holds {capacity}")
        self.trace, self.capacity, self.max_num_seqs, self.budget = trace, capacity, max_num_seqs, budget
        self.arena, self.acct = ContiguousArena(capacity), MemoryAccount(capacity)
        self.waiting: deque[int] = deque()
        self.running: list[_Seq] = []
        self.clock, self.next, self.peak, self.num_done, self.out_tokens = 0.0, 0, 0, 0, 0
        self.refused = False       # this step's admission stopped at a head with no contiguous run

    def arrive(self) -> None:
        trace = self.trace
        if not self.running and not self.waiting:
            self.clock = max(self.clock, trace[self.next].arrival_s)
        while self.next < len(trace) and trace[self.next].arrival_s <= self.clock:
            self.waiting.append(self.next)
            self.next += 1

    def rows(self) -> tuple[list[tuple[_Seq, int]], int, int, int]:
        """This step's (sequence, tokens) rows, decode rows and their context, prefill tokens."""
        budget, num_decode, decode_ctx, prefill = self.budget, 0, 0, 0
        rows: list[tuple[_Seq, int]] = []
        for s in self.running:
            if budget == 0:
                break
            n = min(s.prompt_len - s.computed, budget) if s.computed < s.prompt_len else 1
            rows.append((s, n))
            budget -= n
            if s.computed >= s.prompt_len:
                num_decode, decode_ctx = num_decode + 1, decode_ctx + s.computed + 1
            else:
                prefill += n
        self.refused = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            i = self.waiting[0]
            start = self.arena.allocate(self.sizes[i])
            if start is None:
                self.refused = True
                break
            self.waiting.popleft()
            r = self.trace[i]
            s = _Seq(r.prompt_len, r.output_len, start, self.sizes[i])
            self.running.append(s)
            n = min(r.prompt_len, budget)
            rows.append((s, n))
            budget -= n
            prefill += n
        self.peak = max(self.peak, len(self.running))
        return rows, num_decode, decode_ctx, prefill

    def finish_step(self, rows: list[tuple[_Seq, int]], seconds: float) -> None:
        """The step ran: K/V cached, tokens sampled; account the memory; retire finished requests."""
        self.clock += seconds
        for s, n in rows:
            s.computed += n
            if s.computed >= s.prompt_len:
                s.produced += 1
                self.out_tokens += 1
        if self.waiting:
            held = sum(s.size for s in self.running)
            _account(self.acct, seconds, self.running, self.capacity - held if self.refused else 0)
        keep = []
        for s in self.running:
            if s.produced >= s.output_len:
                self.arena.free(s.start, s.size)
                self.num_done += 1
            else:
                keep.append(s)
        self.running = keep


def _account(acct: MemoryAccount, seconds: float, running: list[_Seq], external: int) -> None:
    tokens = sum(s.computed for s in running)
    final = sum(s.prompt_len + s.output_len for s in running)
    size = sum(s.size for s in running)
    acct.add(seconds, tokens, final - tokens, size - final, external)


def paged_account(result: SimResult) -> AllocatorReport:
    """The same report for a Simulator run of the paged pool (``SimStep.num_kv_tokens`` and
    ``num_used`` pages, over the steps during which some request waited)."""
    ps = result.config.page_size
    acct = MemoryAccount((result.config.num_pages - 1) * ps)
    peak = 0
    for s in result.steps:
        peak = max(peak, s.num_running)
        if s.num_waiting:
            acct.add(s.seconds, s.num_kv_tokens, 0, s.num_used * ps - s.num_kv_tokens, 0)
    out = sum(o.num_output_tokens for o in result.outputs)
    return AllocatorReport("paged", acct.token_share_of_reserved(), acct.shares(), peak, out / result.elapsed_s,
                           len(result.outputs) / result.elapsed_s, result.elapsed_s, acct.seconds)
