"""A hypothesis state machine drives the Scheduler directly (no model) through random arrivals,
follow-up turns, aborts and steps, each step whole (``update``) or in two halves (``advance`` now,
``resolve`` one step later), under each preemption mode, on pools just big enough for the largest
request, with and without the prefix cache, a host pool sometimes too small to swap.

The toy model stores each new token id as the K of its slot and a code of the whole context up to
it as the V, and samples a next token from every cached K and V of the sequence; so a lost, stale
or mixed-up page, or a prefix-cache hit after another prefix, shows up as a token that differs from
the rule computed from the plain token list. After every step: the step keeps the order the
scheduler's docstring promises; pool, host swap and queue bookkeeping are consistent; refcounts
equal the owners; every page holds what its owner says (a running request's pages, a swapped
request's resident pages and host copy, a prefix-cached page's key). At the end the machine
drains: every step schedules something, every request ends with the rule's tokens, and no device
or host page is left in use.
"""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np
from hypothesis import currently_in_test_context, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from hypothesis_budget import scaled

from pagemem import NULL_PAGE, PagePool, PoolConfig, pack_batch
from pagemem.prefix_cache import PrefixCache
from pagemem.scheduler import Request, Scheduler, Status
from pagemem.swap import HostSwap

VOCAB = 97
SHARED = [5, 9, 14, 3, 8, 1, 2, 6, 11, 4]   # prompts may start with some of it: prefix-cache hits
MAX_PROMPT, MAX_OUTPUT = 14, 12
MAX_STALL_STEPS = 500     # drain steps without a sampled token before it counts as a livelock


def context_codes(tokens) -> list[int]:
    """The toy model's V of each position: a rolling code of every token up to it. Unlike the K
    (the token id), it tells a page holding the same tokens after another prefix apart."""
    codes, c = [], 0
    for t in tokens:
        c = (c * 31 + int(t) + 1) % 65521
        codes.append(c)
    return codes


def sample(ks, vs) -> int:
    """The toy model's next token from every cached K and V of a sequence."""
    return int((sum((j + 1) * int(k) for j, k in enumerate(ks)) + sum(int(v) for v in vs)) % VOCAB)


def next_token(tokens) -> int:
    """The toy model's rule, from the plain token list."""
    return sample(tokens, context_codes(tokens))


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    t = list(prompt)
    for _ in range(max_tokens):
        t.append(next_token(t))
    return t[len(prompt):]


class SchedulerMachine(RuleBasedStateMachine):
    preemption = "recompute"

    def __init__(self) -> None:
        super().__init__()
        self.sched = None
        self.reqs = []              # every request added, in order
        self.prompts = {}           # request -> its prompt
        self.aborted = set()
        self.prev = {}              # the previous step's sampled ids, advanced but not resolved yet
        self.num_sampled = 0

    @initialize(page_size=st.sampled_from([1, 2, 4]), spare=st.integers(-3, 2), host_pages=st.sampled_from([1, 2, 64]),
                prefix=st.booleans(), budget=st.integers(1, 16), max_num_seqs=st.integers(1, 4),
                watermark=st.sampled_from([0.0, 0.3]), admit_batch=st.integers(1, 2),
                eviction=st.sampled_from(["lru", "fifo", "priority"]),
                prefill_rate=st.sampled_from([1.0, 1e6, 1e15]))
    def setup(self, page_size, spare, host_pages, prefix, budget, max_num_seqs, watermark, admit_batch,
              eviction, prefill_rate):
        largest = -(-(MAX_PROMPT + MAX_OUTPUT) // page_size)
        num_pages = max(2, largest + spare) + 1      # spare < 0: the largest requests are refused
        self.pool = PagePool(PoolConfig(num_pages, page_size, 1, 1, 1, "float32", "cpu"), eviction)
        self.k, self.v = self.pool.layer_kv(0)
        self.swap = HostSwap(self.pool, host_pages) if self.preemption != "recompute" else None
        self.cache = PrefixCache(self.pool) if prefix else None
        self.sched = Scheduler(self.pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                               preemption=self.preemption, swap=self.swap, prefix_cache=self.cache,
                               watermark=watermark, admit_batch=admit_batch)
        if self.preemption == "auto":
            self.sched.preemptor.set_prefill_rate(prefill_rate)

    # ---- rules ------------------------------------------------------------------------------
    @rule(requests=st.lists(st.tuples(
        st.sampled_from([0, 0, 2, 4]),                                          # SHARED[start:stop] first:
        st.sampled_from([0, 0, 2, 4, 5, 8, 10]),                                # the same pages, or
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_PROMPT),   # the same tokens after
        st.integers(1, MAX_OUTPUT),                                             # another prefix
        st.integers(0, 2)), min_size=1, max_size=3))                            # priority
    def add(self, requests):
        for start, stop, tail, max_tokens, priority in requests:
            self._add((SHARED[start:stop] + tail)[:MAX_PROMPT], max_tokens, priority)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), tail=st.lists(st.integers(0, VOCAB - 1), max_size=3),
          max_tokens=st.integers(1, MAX_OUTPUT), priority=st.integers(0, 2))
    def follow_up(self, data, tail, max_tokens, priority):
        """A prompt continuing an earlier request's tokens, outputs included (a chat's next turn):
        prefix-cache hits on pages filled by decoding."""
        base = self.reqs[data.draw(st.integers(0, len(self.reqs) - 1), label="base")]
        self._add((base.token_ids + tail)[:MAX_PROMPT], max_tokens, priority)

    def _add(self, prompt: list[int], max_tokens: int, priority: int) -> None:
        need = -(-(len(prompt) + max_tokens) // self.pool.page_size)
        try:
            req = self.sched.add(len(self.reqs), prompt, max_tokens, priority)
        except ValueError:
            assert need > self.pool.num_pages - 1, f"refused a request that fits: {need} pages"
            return
        assert need <= self.pool.num_pages - 1
        self.reqs.append(req)
        self.prompts[req] = list(prompt)

    @rule(lagged=st.booleans(), repeat=st.integers(1, 4))
    def step(self, lagged, repeat):
        for _ in range(repeat):
            self._step(lagged)
            self._check_all()

    @precondition(lambda self: any(r.status is not Status.FINISHED for r in self.reqs))
    @rule(data=st.data())
    def abort(self, data):
        live = [r for r in self.reqs if r.status is not Status.FINISHED]
        req = live[data.draw(st.integers(0, len(live) - 1), label="unfinished")]
        self.sched.finish(req)
        self.aborted.add(req)

    # ---- the driver ---------------------------------------------------------------------------
    def _retire(self) -> None:
        """Finish requests whose last output token is known or in flight (a pending id counts)."""
        for r in self.sched.waiting + self.sched.running + self.sched.swapped:
            if r.num_output_tokens >= r.max_tokens:
                self.sched.finish(r)

    def _step(self, lagged: bool) -> None:
        """One step. Lagged: the step is advanced now and its ids resolved by the next step,
        as an engine with asynchronous sampling does; otherwise resolved at once (update)."""
        self._retire()
        sched = self.sched
        before = {r: r.status for r in sched.waiting + sched.running + sched.swapped}
        step = sched.schedule() if sched.has_unfinished() else None
        if step is not None:
            assert step.requests or self.prev, "nothing scheduled and nothing in flight: deadlock"
            self._check_step(step, before)
        cur = {}
        if step is not None and step.requests:
            cur = self._forward(step)
            self.num_sampled += len(cur)
            if not lagged and not self.prev:
                sched.update(step, cur)             # both halves at once
                self._retire()
                return
            sched.advance(step, list(cur))
        sched.resolve(self.prev)                    # the previous step's ids come first
        self.prev = cur if lagged else {}
        if not lagged:
            sched.resolve(cur)
        self._retire()

    def _forward(self, step) -> dict:
        """Store each new token as its K and its context code as its V (a pending token's id comes
        from the previous step), then sample each request whose chunk reached its last token from
        every cached K and V."""
        k, v, ps = self.k, self.v, self.pool.page_size
        new, codes = [], []
        for r, n in zip(step.requests, step.query_lens):
            tokens = r.token_ids + ([self.prev[r]] if r.num_pending else [])
            assert len(tokens) == r.num_tokens
            new += tokens[r.num_computed:r.num_computed + n]
            codes += context_codes(tokens[:r.num_computed + n])[r.num_computed:]
        batch = pack_batch([r.pages for r in step.requests], step.query_lens)
        s = batch.slot_mapping
        assert len(new) == len(s)
        k[s // ps, s % ps, 0, 0] = new
        v[s // ps, s % ps, 0, 0] = codes
        out = {}
        for r in step.requests:
            if r.pages.num_tokens == r.num_tokens:
                s = r.pages.slots(0, r.num_tokens)
                out[r] = sample(k[s // ps, s % ps, 0, 0], v[s // ps, s % ps, 0, 0])
        return out

    # ---- checks ---------------------------------------------------------------------------------
    def _check_step(self, step, before: dict) -> None:
        """The step's rows, and the order the module docstring promises: running requests most
        important first within the budget, victims the least important, swapped requests back
        before any new one, admission first-come first-served within a priority."""
        sched = self.sched
        assert step.num_tokens <= sched.max_num_batched_tokens
        assert len({id(r) for r in step.requests}) == len(step.requests)
        for r, n in zip(step.requests, step.query_lens):
            assert r.status is Status.RUNNING and n >= 1
            assert r.pages.num_tokens == r.num_computed + n <= r.num_tokens
            assert not r.num_pending or n == 1, "a row with a pending id is a decode row"
        decode = [n == 1 for n in step.query_lens]
        assert decode == sorted(decode, reverse=True), f"decode rows first: {step.query_lens}"
        contexts = [r.pages.num_tokens for r, n in zip(step.requests, step.query_lens) if n != 1]
        assert contexts == sorted(contexts), f"prefill rows shortest context first: {contexts}"
        order = Request._order
        ran = [r for r in step.requests if before[r] is Status.RUNNING]
        resumed = step.resumed
        assert all(before[r] is Status.SWAPPED for r in resumed) and len(set(resumed)) == len(resumed)
        # admitted: waiting before, or swapped and demoted to recompute by this very step
        admitted = [r for r in step.requests if before[r] is not Status.RUNNING and r not in resumed]
        for victim, mode in step.preempted:
            assert before[victim] is Status.RUNNING and victim.status in (Status.WAITING, Status.SWAPPED)
            assert mode == "recompute" if self.preemption == "recompute" else mode in ("swap", "recompute")
            assert all(order(r) < order(victim) for r in ran), "a more important request was preempted"
        if step.preempted:
            assert not resumed and not admitted, "resumed or admitted in a step that preempted"
        skipped = [r for r in sched.running if before[r] is Status.RUNNING and r not in ran]
        if skipped:     # a running request left out: the budget ran out on more important ones
            used = sum(n for r, n in zip(step.requests, step.query_lens) if r in ran)
            assert used == sched.max_num_batched_tokens
            assert max(map(order, ran)) < min(map(order, skipped))
        if admitted:
            assert not sched.swapped, "admitted while a request is still swapped"
            line = sorted(admitted + sched.waiting, key=order)
            assert sorted(admitted, key=order) == line[:len(admitted)], "admission overtook an earlier request"
            if len(sched.running) >= 2:
                assert self.pool.num_free_pages >= sched.watermark_pages, "admitted below the watermark"
        if resumed:
            line = sorted(resumed + sched.swapped, key=order)
            assert sorted(resumed, key=order) == line[:len(resumed)], "resumed out of order"

    @invariant()
    def consistent(self):
        self._check_all()

    def _check_all(self) -> None:
        self.pool.check_integrity()
        if self.swap is not None:
            self.swap.check_integrity()
        self._check_queues()
        self._check_refcounts()
        self._check_contents()

    def _check_queues(self) -> None:
        sched = self.sched
        queued = {id(r) for r in sched.waiting + sched.running + sched.swapped}
        num_queued = len(sched.waiting) + len(sched.running) + len(sched.swapped)
        assert len(queued) == num_queued, "a request is in two queues"
        assert len(sched.running) <= sched.max_num_seqs
        for r in sched.waiting:
            assert r.status is Status.WAITING and r.pages is None and r.preempted is None
            assert r.num_computed == 0
        for r in sched.running:
            assert r.status is Status.RUNNING and r.preempted is None
            assert r.pages.num_tokens == r.num_computed, "a running request's K/V lag its pages"
            assert len(r.pages.page_table) == -(-r.num_computed // self.pool.page_size)
        for r in sched.swapped:
            assert r.status is Status.SWAPPED and r.pages is None and r.preempted is not None
            assert not r.preempted.spent and r.preempted.num_tokens == r.num_computed
        if sched.running and sched.swapped:   # victims are the least important: why demotion stops at the first more important
            assert max(map(Request._order, sched.running)) < min(map(Request._order, sched.swapped))
        # preemptions by the mode that served them: the requests' own counts add up to the scheduler's
        assert sum(r.num_preemptions for r in self.reqs) == sum(sched.num_preemptions.values())
        assert sum(r.num_demotions for r in self.reqs) == sched.num_demotions <= sched.num_preemptions["recompute"]
        for r in self.reqs:
            assert (id(r) in queued) == (r.status is not Status.FINISHED)
            if r.status is Status.FINISHED:
                assert r.pages is None and r.preempted is None
            assert r.token_ids[:r.num_prompt_tokens] == self.prompts[r]
            assert r.num_pending == (r in self.prev)

    def _check_refcounts(self) -> None:
        """Each page's refcount is the number of its owners: running page tables, swapped
        requests' resident pages, swap-outs still in flight."""
        owners = Counter()
        for r in self.sched.running:
            owners.update(r.pages.page_table)
        for r in self.sched.swapped:
            owners.update(p for p in r.preempted.page_table if p != NULL_PAGE)
        if self.swap is not None:
            for pend in self.swap._pending:
                owners.update(pend.page_ids)
        rc = self.pool._refcount
        wrong = {p: (rc[p], owners[p]) for p in range(1, self.pool.num_pages) if rc[p] != owners[p]}
        assert not wrong, f"page: (refcount, owners) {wrong}"

    def _check_contents(self) -> None:
        """Every page holds what its owner says: (K, V) = (token, context code) of each computed
        token of a running request (device) or swapped one (device or host); a cached page, the
        tokens of its key."""
        k, v, ps = self.k, self.v, self.pool.page_size
        for r in self.sched.running:
            known = min(r.num_computed, len(r.token_ids))
            s = r.pages.slots(0, known)
            page, off = s // ps, s % ps
            got = list(zip(k[page, off, 0, 0].astype(int).tolist(), v[page, off, 0, 0].astype(int).tolist()))
            want = list(zip(r.token_ids[:known], context_codes(r.token_ids[:known])))
            assert got == want, f"request {r.request_id}: pages hold {got}, not {want}"
        for r in self.sched.swapped:
            rec = r.preempted
            got = []
            for t in range(min(r.num_computed, len(r.token_ids))):
                i, off = divmod(t, ps)
                if rec.page_table[i] != NULL_PAGE:
                    page = self.pool.kv[rec.page_table[i], 0]
                else:
                    page = self.swap.host[rec.ticket.host_slots[rec.swapped_at.index(i)], 0]
                got.append((int(page[0, off, 0, 0]), int(page[1, off, 0, 0])))
            want = list(zip(r.token_ids[:len(got)], context_codes(r.token_ids[:len(got)])))
            assert got == want, f"swapped request {r.request_id}: holds {got}, not {want}"
        for page, key in self.pool._key_of.items():
            assert k[page, :, 0, 0].tolist() == list(key[1]), f"cached page {page} lost its tokens"

    # ---- the end: drain ---------------------------------------------------------------------------
    def teardown(self):
        # hypothesis calls teardown in a ``finally``: after a failed rule or check, report that error
        if self.sched is None or sys.exc_info()[0] is not None:
            return
        # Outputs are bounded (max_tokens), so steps that keep sampling end; a long run without a
        # sampled token is a livelock (requests preempting each other, say).
        stalled, num_sampled = 0, self.num_sampled
        while self.sched.has_unfinished() or self.prev:
            self._step(lagged=False)
            self._check_all()
            stalled = 0 if self.num_sampled > num_sampled else stalled + 1
            num_sampled = self.num_sampled
            assert stalled < MAX_STALL_STEPS, f"{MAX_STALL_STEPS} steps without a sampled token: livelock"
        for r in self.reqs:
            assert r.status is Status.FINISHED and r.num_pending == 0
            out, want = r.token_ids[r.num_prompt_tokens:], expected(self.prompts[r], r.max_tokens)
            if r in self.aborted:
                assert out == want[:len(out)], (self.prompts[r], out, want)
            else:
                assert out == want, (self.prompts[r], out, want)
        if self.swap is not None:
            self.swap.reclaim(wait=True)
            self.swap.check_integrity()
            assert self.swap.num_free_host_pages == self.swap.num_host_pages, "host pages leaked"
        self.pool.check_integrity()
        self._check_contents()
        stats = self.pool.stats()
        assert stats.num_used == 0, f"{stats.num_used} pages leaked"
        if self.cache is None:
            assert stats.num_free == stats.num_pages


class SwapSchedulerMachine(SchedulerMachine):
    preemption = "swap"


class AutoSchedulerMachine(SchedulerMachine):
    preemption = "auto"


class SharedPrefixSwapMachine(SchedulerMachine):
    """Swap with the prefix cache on a tight pool and small budgets: swapped requests keep shared
    pages resident, so the scheduler must demote some to recompute (rare in the machines above)."""
    preemption = "swap"

    @initialize(page_size=st.sampled_from([2, 4]), spare=st.integers(-3, 0), budget=st.integers(1, 6),
                max_num_seqs=st.integers(2, 3), eviction=st.sampled_from(["lru", "fifo", "priority"]))
    def setup(self, page_size, spare, budget, max_num_seqs, eviction):
        super().setup(page_size, spare, host_pages=64, prefix=True, budget=budget, max_num_seqs=max_num_seqs,
                      watermark=0.0, admit_batch=1, eviction=eviction, prefill_rate=1.0)

    @rule(requests=st.lists(st.tuples(
        st.sampled_from([4, 8, 10]), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
        st.integers(1, MAX_OUTPUT), st.integers(0, 2)), min_size=1, max_size=3))
    def add(self, requests):
        """Every prompt starts with SHARED: pages shared by most requests."""
        for stop, tail, max_tokens, priority in requests:
            self._add(SHARED[:stop] + tail, max_tokens, priority)

    def teardown(self):
        """Drain as every machine does; under hypothesis, steer the search towards runs with many
        demotions."""
        super().teardown()
        if self.sched is not None and sys.exc_info()[0] is None and currently_in_test_context():
            target(self.sched.num_demotions, label="demotions")


def test_shared_prefix_swaps_drain_by_demoting_to_recompute():
    """The machine above, on a run it found: five prompts starting with SHARED[:4] or SHARED[:8] in
    12 usable 2-token pages, under each eviction policy. Draining it demotes a swapped request to
    recompute; every check of the machine holds after every step and the outputs are the rule's."""
    for eviction in ("lru", "fifo", "priority"):
        machine = SharedPrefixSwapMachine()
        machine.setup(page_size=2, spare=-1, budget=3, max_num_seqs=3, eviction=eviction)
        machine.add([(4, [0], 1, 0), (4, [0, 0, 0, 0, 0], 8, 0), (4, [0], 7, 0)])
        machine.add([(4, [0], 1, 0), (8, [0], 1, 0)])
        machine.teardown()
        assert machine.sched.num_demotions > 0, f"{eviction}: no swapped request was demoted"
        assert machine.sched.num_preemptions["recompute"] >= machine.sched.num_demotions


_SETTINGS = settings(max_examples=scaled(100), stateful_step_count=40, deadline=None)
for _machine in (SchedulerMachine, SwapSchedulerMachine, AutoSchedulerMachine, SharedPrefixSwapMachine):
    _machine.TestCase.settings = _SETTINGS
TestRecomputeScheduler = SchedulerMachine.TestCase
TestSwapScheduler = SwapSchedulerMachine.TestCase
TestAutoScheduler = AutoSchedulerMachine.TestCase
TestSharedPrefixSwapScheduler = SharedPrefixSwapMachine.TestCase
