"""Scheduler: continuous batching over the page pool, with preemption by swap or recompute.

It knows requests, pages and token counts, never a model. Each ``schedule()`` returns
the requests to run this step and how many of their tokens to compute; the caller runs
the model on them and reports back with ``update()``, or in two halves: ``advance()`` as soon
as the step is queued (its K/V count as cached; the rows that sample gain a pending token of
unknown id) and ``resolve()`` when the sampled ids reach the host. Between the two the next
step may already be scheduled: a request with a pending token decodes it (its id is fed on the
device), while admission and resume wait for the ids, since they need every token.

One step, in order:

    1. running requests, most important first (higher ``priority``, then earlier arrival),
       each gets its next chunk (1 token when decoding) within the token budget; when the
       pool has no page for it, the least important, latest-arrived running request not yet
       scheduled this step is preempted (possibly the request itself), by swap or recompute;
    2. if nothing was preempted: swapped requests resume first (swap_in); only when none is
       left swapped are waiting requests admitted, in order, while pages stay above the
       watermark. Admission is first-come first-served within a priority, so no request
       starves behind later ones. A swapped request keeps the pages it shares resident; when
       those leave no room for a more important request (running alone, or first in line to
       resume while nothing runs), the least important such swapped requests are turned into
       recompute preemptions (their host copies dropped), so the queue never waits on itself.

Swaps are deferred (HostSwap ``defer=True``): a swapped-out victim's pages are free at once for
the rows after it, a resumed request's pages are allocated at once, and before ``schedule()``
returns one ``HostSwap.flush`` queues all of the step's swap-outs as one copy and all of its
swap-ins as another, which the compute stream waits on (the host waits on none).
"""
from __future__ import annotations

import enum
import itertools
import operator
from itertools import compress
from dataclasses import dataclass, field
from typing import Any

from pagemem.page_table import SeqPages
from pagemem.pool import PagePool
from pagemem.preemption import Preempted, Preemptor, check_mode
from pagemem.prefix_cache import PrefixCache
from pagemem.swap import HostSwap, OutOfHostPages


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One sequence as the scheduler sees it: its tokens and where their K/V live."""

    request_id: Any
    token_ids: list[int]              # prompt + generated so far
    num_prompt_tokens: int
    max_tokens: int
    priority: int = 0                 # higher runs first and is preempted last
    arrival: int = 0
    status: Status = Status.WAITING
    pages: SeqPages | None = None     # None while waiting or swapped
    num_computed: int = 0             # tokens whose K/V are in the cache
    preempted: Preempted | None = None  # the swap record while swapped
    num_preemptions: int = 0
    num_cached_tokens: int = 0        # prompt tokens served by the prefix cache
    num_registered_pages: int = 0     # leading full pages already offered to the prefix cache
    num_pending: int = 0              # sampled tokens the caller has not reported yet (advance/resolve)
    num_demotions: int = 0            # swap preemptions turned into recompute ones (host copy dropped)
    _key: tuple = field(init=False, repr=False, compare=False)   # _order(), fixed at creation

    def __post_init__(self) -> None:
        self._key = (-self.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, counting sampled ones not reported yet (whose ids are still unknown)."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_prompt_tokens

    def _order(self) -> tuple[int, int]:
        """Sort key: most important first."""
        return self._key


_ORDER = operator.attrgetter("_key")   # Request._order for sorts, without a Python call a request
_STATUS, _PENDING = operator.attrgetter("status"), operator.attrgetter("num_pending")


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """What to compute this step: ``query_lens[i]`` new tokens of ``requests[i]``."""

    requests: list[Request]
    query_lens: list[int]
    preempted: list[tuple[Request, str]]   # (request, "swap" | "recompute")
    resumed: list[Request]
    num_prefill_tokens: int = 0            # tokens of rows that are not decode rows (see schedule())

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class Scheduler:
    """Continuous batching over a PagePool. ``swap`` (a HostSwap) is needed for "swap" and "auto";
    ``prefix_cache`` (a PrefixCache) shortens prefill on hits. In "auto" the Preemptor's cost
    model picks per request; feed it with ``scheduler.preemptor.set_prefill_rate(tokens_per_s)``."""

    def __init__(self, pool: PagePool, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 preemption: str = "recompute", swap: HostSwap | None = None,
                 prefix_cache: PrefixCache | None = None,
                 watermark: float = 0.01, admit_batch: int = 1, stream=None) -> None:
        if check_mode(preemption, "preemption") != "recompute" and swap is None:
            raise ValueError(f"preemption={preemption!r} needs a HostSwap (swap=...)")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        if isinstance(admit_batch, bool) or not isinstance(admit_batch, int) or admit_batch < 1:
            raise ValueError(f"admit_batch must be an int >= 1, got {admit_batch!r}")
        self.admit_batch = admit_batch
        self.pool, self.swap, self.prefix_cache = pool, swap, prefix_cache
        self.preemptor = Preemptor(swap, pool=pool)
        self.preemption, self.stream = preemption, stream
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.watermark_pages = int(watermark * (pool.num_pages - 1))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        # Whether waiting / running (by id) are in _order: kept by _append, the only way in, so
        # that a step sorts neither while nothing came in out of order (keys are unique, so
        # removals keep a queue sorted); a queue of 100,000 waiting requests costs nothing a step.
        self._sorted = {id(self.waiting): True, id(self.running): True}
        self._arrivals = itertools.count()
        # Preemptions by the mode that served them: a swap turned into a recompute (demotion, its
        # host copy dropped) counts as a recompute, and once in num_demotions.
        self.num_preemptions = {"swap": 0, "recompute": 0}
        self.num_demotions = 0

    # ---- requests ----------------------------------------------------------------------------
    def add(self, request_id, prompt_ids: list[int], max_tokens: int, priority: int = 0) -> Request:
        """Queue a request. Raises ValueError if its prompt plus output could never fit the pool."""
        self.check(request_id, prompt_ids, max_tokens, priority)
        req = Request(request_id, list(prompt_ids), len(prompt_ids), max_tokens, priority, next(self._arrivals))
        self._append(self.waiting, req)
        return req

    def check(self, request_id, prompt_ids: list[int], max_tokens: int, priority: int = 0) -> None:
        """Raise what add() would raise for this request, changing nothing."""
        if len(prompt_ids) < 1:
            raise ValueError(f"request {request_id!r}: prompt_ids is empty")
        if max_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_tokens must be >= 1, got {max_tokens}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"request {request_id!r}: priority must be an int, got {type(priority).__name__}")
        need = -(-(len(prompt_ids) + max_tokens) // self.pool.page_size)
        if need > self.pool.num_pages - 1:
            raise ValueError(f"request {request_id!r} needs {need} pages for {len(prompt_ids)} prompt + "
                             f"{max_tokens} output tokens; the pool has {self.pool.num_pages - 1}")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Choose this step's requests and token counts; allocate their pages (SeqPages.grow).
        Requests come back decode rows first (query length 1), then prefill rows by context length.

        A decode row computes a request's last known token, an output token (one of the prompt's is
        prefill, even alone in a row of one); ``num_prefill_tokens`` counts the tokens of the other rows.
        """
        if self.swap is not None:
            self.swap.reclaim()          # pages of finished swap-outs return to the pool
        budget = self.max_num_batched_tokens
        out: list[Request] = []
        lens: list[int] = []
        preempted: list[tuple[Request, str]] = []
        if not self._sorted[id(self.running)]:
            self.running.sort(key=_ORDER)
            self._sorted[id(self.running)] = True
        queue = self.running[::-1]                                # most important last: pop() is O(1)
        prefill, stream, ps, rc = 0, self.stream, self.pool.page_size, self.pool.refcounts
        swap = self.swap
        while queue and budget > 0:     # once per running request a step: kept to plain operations
            req = queue.pop()
            pages = req.pages
            left = len(req.token_ids) + req.num_pending - req.num_computed
            n = left if left < budget else budget
            if n == 1 and pages.num_tokens % ps and rc[pages.page_table[-1]] == 1:
                pages.num_tokens += 1      # SeqPages.try_grow's first case (a private partial page), inlined
            else:
                # grows when the pages are there (after queueing deferred swaps if it copies on write)
                while not (pages.try_grow(n, stream) if swap is None or not swap.has_deferred
                           else self._try_grow(pages, n)):
                    if not queue and self._demote_one_below(req):
                        continue
                    victim = queue.pop(0) if queue else req     # least important, latest arrived
                    preempted.append((victim, self._preempt(victim)))
                    if victim is req:
                        break
                if req.status is not Status.RUNNING:
                    continue
            out.append(req)
            lens.append(n)
            budget -= n
            if n != 1 or left != 1 or req.num_computed < req.num_prompt_tokens:
                prefill += n
        rows = [] if preempted else self._resume_swapped(budget)
        resumed = [req for req, _ in rows]
        if not preempted and not self.swapped:   # swapped requests come back before any new one is admitted
            rows += self._admit_waiting(budget - sum(n for _, n in rows))
        for req, n in rows:
            out.append(req)
            lens.append(n)
            if n != 1 or req.num_tokens - req.num_computed != 1 or req.num_computed < req.num_prompt_tokens:
                prefill += n
        if swap is not None and swap.has_deferred:
            swap.flush(stream)       # the step's swap-outs as one copy, its swap-ins as another
        return ScheduledStep(*_decode_rows_first(out, lens), preempted, resumed, prefill)

    def update(self, step: ScheduledStep, new_tokens: dict[Request, int]) -> None:
        """Record that ``step`` ran: its K/V are cached; append each sampled token.
        ``new_tokens`` maps a request whose chunk reached its last token to the sampled id."""
        self.advance(step, new_tokens)
        self.resolve(new_tokens)

    def advance(self, step: ScheduledStep, sampled) -> None:
        """``step`` is queued: its K/V count as cached, and each request in ``sampled`` (those
        whose chunk reached their last token) gains one pending token, reported by ``resolve``."""
        if list(map(_STATUS, step.requests)).count(Status.RUNNING) != len(step.requests):   # in C loops
            req = next(r for r in step.requests if r.status is not Status.RUNNING)
            raise ValueError(f"request {req.request_id!r} is {req.status.value}, not running")
        if self.prefix_cache is None:        # nothing to register: the loop without the call
            for req in step.requests:
                req.num_computed = req.pages.num_tokens
        else:
            for req in step.requests:
                req.num_computed = req.pages.num_tokens
                self._register(req)
        for req in sampled:
            req.num_pending += 1

    def resolve(self, new_tokens: dict[Request, int]) -> None:
        """Append the sampled ids of pending tokens, in order; finished requests take them too."""
        if new_tokens and min(map(_PENDING, new_tokens)) < 1:                 # checked in a C loop
            req = next(r for r in new_tokens if r.num_pending < 1)
            raise ValueError(f"request {req.request_id!r} has no pending token")
        if self.prefix_cache is None:        # nothing to register: the loop without the call
            for req, tok in new_tokens.items():
                req.num_pending -= 1
                req.token_ids.append(tok)
            return
        for req, tok in new_tokens.items():
            req.num_pending -= 1
            req.token_ids.append(tok)
            if req.pages is not None:
                self._register(req)

    def drop_pending(self, reqs) -> None:
        """Forget a pending token of each of ``reqs`` (one per occurrence) whose id will never be
        reported: the request stopped or was aborted while its row ran, or the step that drew it
        failed. Requests with no pending token left are passed over."""
        for req in reqs:
            if req.num_pending > 0:
                req.num_pending -= 1

    def _register(self, req: Request) -> None:
        """Offer the request's newly full pages, of known and computed tokens, to the prefix cache."""
        known = min(req.num_computed, len(req.token_ids))
        if self.prefix_cache is not None and known // self.pool.page_size > req.num_registered_pages:
            self.prefix_cache.register(req.pages.page_table, req.token_ids[:known],
                                       start=req.num_registered_pages)
            req.num_registered_pages = known // self.pool.page_size

    def finish(self, req: Request) -> None:
        """Retire a request wherever it is: a running one releases its pages (tail first), a
        swapped one its host copy; a waiting one just leaves the queue."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            req.pages.free(req.priority)
            req.pages = None
        elif req.status is Status.SWAPPED:
            self.swapped.remove(req)
            self.preemptor.discard(req.preempted)
            req.preempted = None
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    # ---- preemption --------------------------------------------------------------------------------
    def _preempt(self, req: Request) -> str:
        """Take ``req``'s pages away through the Preemptor: swap keeps its K/V on the host (shared
        pages stay resident), recompute drops them and keeps its tokens. Falls back to recompute
        when the host pool is full. Returns the mode used."""
        mode = self.preemption
        if mode == "auto" and self.preemptor.prefill_tokens_per_s is None:
            mode = "swap"   # no prefill figure yet: swapping yields the first bandwidth figure
        try:
            # Deferred: the swapped pages are free now; schedule() queues one copy for all of the
            # step's swap-outs (HostSwap.flush) before anything writes them, and the compute
            # stream waits on it: the host never waits on a swap.
            record = self.preemptor.preempt(req.pages, mode, self.stream, req.priority, defer=True)
        except OutOfHostPages:
            record = self.preemptor.preempt(req.pages, "recompute", self.stream, req.priority)
        self.running.remove(req)
        req.pages = None
        if record.mode == "swap":
            req.preempted, req.status = record, Status.SWAPPED
            self.swapped.append(req)
        else:
            self._requeue(req)
        req.num_preemptions += 1
        self.num_preemptions[record.mode] += 1
        return record.mode

    def _try_grow(self, pages: SeqPages, n: int) -> bool:
        """SeqPages.try_grow, after queueing the step's deferred swaps if the growth would copy a
        shared page (copy-on-write writes a fresh page, maybe one a deferred swap-out still reads)."""
        if self.swap is not None and self.swap.has_deferred and pages.needs_copy_on_write(n):
            self.swap.flush(self.stream)
        return pages.try_grow(n, self.stream)

    def _watermark(self) -> int:
        """Pages kept free at admission; waived when nothing runs, so a lone request always fits."""
        return self.watermark_pages if self.running else 0

    def _resume_swapped(self, budget: int) -> list[tuple[Request, int]]:
        """Swap requests back in, most important first, while pages and the budget allow.
        Returns their rows: (request, tokens to compute this step)."""
        self.swapped.sort(key=_ORDER)
        rows = []
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.swapped[0]
            if req.num_pending:      # its ids are not known yet; next step
                break
            n = min(req.num_tokens - req.num_computed, budget)
            total = len(req.preempted.swapped_at) + self._pages_to_grow(req.num_computed, n)
            if not self.pool.can_allocate(total + self._watermark()):
                if self.running or not self._demote_for(req, total):
                    break
            self.swapped.pop(0)
            req.pages = self.preemptor.resume(req.preempted, stream=self.stream, defer=True)
            req.preempted, req.num_registered_pages = None, 0   # swapped-in pages are new, unindexed
            rows.append(self._start(req, n))
            budget -= n
        return rows

    def _demote_for(self, head: Request, need: int) -> bool:
        """Nothing runs and ``head``, the most important swapped request, needs ``need`` pages
        that are not there: demote less important swapped requests until they are. Returns
        whether they are."""
        while not self.pool.can_allocate(need):
            if not self._demote_one_below(head):
                return False
        return True

    def _demote_one_below(self, req: Request) -> bool:
        """A swapped request keeps the pages it shares resident, and only resuming it frees them.
        When they stand in the way of ``req`` (running alone and unable to grow, or the first swapped
        request when nothing runs), the least important such request less important than ``req``
        becomes a recompute preemption: its host copy is dropped, its resident references go back
        to the pool (prefix-cached, for its own prefill later). Returns whether one was demoted;
        without this the queue could wait on itself."""
        key = req._order()
        for victim in sorted(self.swapped, key=_ORDER, reverse=True):
            if victim._order() <= key:
                return False
            if victim.preempted.resident:
                self.swapped.remove(victim)
                self.preemptor.discard(victim.preempted)
                victim.preempted = None
                self._requeue(victim)        # still one preemption, now to be recomputed
                self.num_preemptions["swap"] -= 1
                self.num_preemptions["recompute"] += 1
                victim.num_demotions += 1
                self.num_demotions += 1
                return True
        return False

    def _append(self, queue: list[Request], req: Request) -> None:
        if queue and queue[-1]._key > req._key:
            self._sorted[id(queue)] = False
        queue.append(req)

    def _requeue(self, req: Request) -> None:
        """A request whose K/V are gone waits again, its tokens kept, to be prefilled anew."""
        req.num_computed, req.num_registered_pages, req.status = 0, 0, Status.WAITING
        self._append(self.waiting, req)

    def _admit_waiting(self, budget: int) -> list[tuple[Request, int]]:
        """Admit waiting requests in order. With ``admit_batch`` > 1, while others run, wait until
        that many sequence slots are free: prefills then come in batches and most steps stay
        pure decode (which a CUDA graph can replay), at some cost in time to first token.
        Returns their rows: (request, tokens to compute this step)."""
        slots = self.max_num_seqs - len(self.running)
        if self.running and slots < min(self.admit_batch, len(self.waiting)):
            return []
        if not self._sorted[id(self.waiting)]:
            self.waiting.sort(key=_ORDER)
            self._sorted[id(self.waiting)] = True
        rows = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:      # prefill needs every token id; next step
                break
            # Decide with peek (no side effects); reviving an evictable hit consumes a free page.
            hits = self.prefix_cache.peek(req.token_ids) if self.prefix_cache is not None else []
            computed = len(hits) * self.pool.page_size
            n = min(req.num_tokens - computed, budget)
            revived = sum(1 for p in hits if self.pool.refcounts[p] == 0)
            if not self.pool.can_allocate(self._pages_to_grow(computed, n) + revived + self._watermark()):
                break
            self.waiting.pop(0)
            cached = self.prefix_cache.match(req.token_ids) if hits else []
            req.pages = SeqPages(self.pool, cached, computed)
            req.num_computed = computed
            req.num_registered_pages = len(cached)
            req.num_cached_tokens = max(req.num_cached_tokens, min(computed, req.num_prompt_tokens))
            rows.append(self._start(req, n))
            budget -= n
        return rows

    def _pages_to_grow(self, num_tokens: int, n: int) -> int:
        ps = self.pool.page_size
        return -(-(num_tokens + n) // ps) - -(-num_tokens // ps)

    def _start(self, req: Request, n: int) -> tuple[Request, int]:
        """Run ``n`` tokens of ``req`` this step; returns its row."""
        if self.swap is not None and self.swap.has_deferred and req.pages.needs_copy_on_write(n):
            self.swap.flush(self.stream)       # a copy-on-write may write a page a deferred copy reads
        req.pages.grow(n, self.stream)         # may raise OutOfPages: then nothing changed
        req.status = Status.RUNNING
        self._append(self.running, req)
        return req, n


def _decode_rows_first(out: list[Request], lens: list[int]) -> tuple[list[Request], list[int]]:
    """Decode rows first, in order: the model runs them through the decode kernel, the rest
    through prefill, shortest context first (ties in order), so a model can cut them into
    groups of similar length. The selections run in C: a step may hold thousands of rows."""
    if lens.count(1) == len(lens):   # decode rows only: already in order
        return out, lens
    decode = list(compress(out, map((1).__eq__, lens)))
    rest = sorted(compress(range(len(out)), map((1).__ne__, lens)), key=lambda i: out[i].pages.num_tokens)
    return decode + [out[i] for i in rest], [1] * len(decode) + [lens[i] for i in rest]
