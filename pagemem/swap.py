"""HostSwap: pages to pinned host memory and back, on copy streams, handed out as tickets.

Who owns a swapped page, in order:

    swap_out(page_ids)  the caller's one reference to each device page moves to the ticket, and
                        host slots are taken for them. The device-to-host copy runs on the out
                        stream after everything already queued on the compute stream; once it has
                        completed (its event polled, never a device-wide synchronize), ``reclaim()``
                        frees the pages (free queue, or eviction policy if the prefix cache has them).
    swap_in(ticket)     allocates fresh device pages (refcount 1, the caller's), copies the host
                        slots into them on the in stream and makes the compute stream wait on that
                        copy. The ticket is spent; ``reclaim()`` frees its host slots after the copy.
    discard(ticket)     the sequence was dropped: the host slots are released once the out copy is done.

Deferred calls (``defer=True``, then ``flush(stream)``) gather a scheduler step's swaps into one copy
a direction. A deferred ``swap_out`` takes the host slots and gives the pages back to the pool at
once (the step may hand them out again); a deferred ``swap_in`` allocates and returns the new pages.
``flush`` plans one copy over every deferred swap-out's pages, then one over every deferred
swap-in's, and makes the compute stream wait on both, so what it queues later (the forward writing
those pages) runs after them: the host never waits. Until ``flush`` nothing may write pool pages on
any stream (the scheduler flushes before a copy-on-write and before it returns the step); the
other data-moving calls (``swap_out``, ``swap_in``, ``wait``) flush first, so copies keep their order.

Shared pages: ``swap_out`` refuses a page whose refcount is above 1 (ValueError, nothing changed):
swapping it would free no memory and leave two copies to keep coherent; a preempted sequence keeps
its shared pages resident instead (``pagemem.preemption``).

Copy paths (``path="auto"``, per call): positions where both the page id and the host slot advance by
one merge into runs, one ``cudaMemcpyAsync`` each (pages are contiguous in the page-major pool),
used when the mean run holds ``min_run_bytes``; otherwise pages are gathered on the device into a
staging buffer of ``staging_bytes`` and sent in one copy per contiguous host run, chunk by chunk
(swap-in mirrors it). Measured on an H100 (bench/RESULTS.md, 2026-11-26): 4096 scattered pages moved
at 89%/87% of the pinned ceiling (out/in) one copy per 1 MiB page and 21%/18% per 32 KiB page, against
96%/93% and 84%/87% gathered. A call is planned on the host before its first CUDA call (and before it
takes a host slot), then queued in one burst (``pagemem._swap_copy``); staging pages, pinned id
buffers and timing events are reused across calls. ``copy_kernel``
(``pagemem.kernels.swap_copy.copy_pages``) replaces CuPy's take and indexed assignment around the
staging buffer with one launch reading the ids from pinned memory (no upload). ``path="direct"``
(by name only) is one kernel moving pages straight between the pool and mapped pinned memory: fewest
calls, but its PCIe traffic from the SMs disturbs kernels beside it and duplex moves less (H100,
2026-11-27), so "auto" keeps the copy engines. The CPU carries out the same plans with NumPy copies.

Counters: ``num_calls`` (copies queued a direction: a call, or a flush's direction), ``copy_s``
(their device seconds), ``wait_s`` (host seconds blocked on them in ``wait``/``reclaim(wait=True)``).
"""
from __future__ import annotations

import operator
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pagemem._swap_copy import D2H, H2D, CopyPlan, PinnedCopier, copy_numpy, direct_ok, plan_copies
from pagemem._swap_copy import merge_runs  # noqa: F401  (re-exported: callers import it from here)
from pagemem.config import check_int
from pagemem.pool import OutOfPages, PagePool

PATHS = ("auto", "runs", "direct", "gather")


class OutOfHostPages(RuntimeError):
    """swap_out() needs more host pages than are free (check can_swap_out first). Nothing changed:
    a scheduler falls back to preemption by recompute."""


@dataclass(eq=False, slots=True)
class SwapTicket:
    """Handle to pages swapped out to host memory. Spent by ``swap_in`` or ``discard``, once.

    ``event`` (a CuPy event, None on the CPU) completes when the out copy has; ``state`` is
    "out" (data on host, or on its way), then "in" or "discarded". ``staged``: a deferred
    swap-out whose copy ``flush`` has not queued yet. Once a copy has completed and been
    reclaimed its event may serve a later copy of the same stream: waiting on it is never early.
    """

    host_slots: list[int]   # host page index of each swapped page, in the order given to swap_out
    nbytes: int
    event: Any = None
    state: str = "out"
    owner: Any = field(default=None, repr=False)
    slot_array: Any = field(default=None, repr=False)  # host_slots as a read-only [n] int64 array
    staged: bool = field(default=False, repr=False)

    @property
    def num_pages(self) -> int:
        return len(self.host_slots)

    def is_done(self) -> bool:
        """Whether the out copy has completed (on the CPU: once queued). Changes nothing."""
        return not self.staged and (self.event is None or self.event.done)


@dataclass(eq=False, slots=True)
class _Pending:
    """Work whose resources are released when ``event`` completes."""

    event: Any                     # CuPy event or None (CPU: already complete)
    start: Any                     # timing event on the copy stream, or None
    direction: str                 # "out" | "in" | "discard"
    nbytes: int
    seconds: float = 0.0           # CPU copies: measured with perf_counter
    page_ids: list[int] = field(default_factory=list)    # device refs to drop (swap-out)
    host_slots: Any = ()           # [n] int64 host slots to free (swap-in, discard)
    priority: int = 0
    released: bool = False         # pages given back before the copy (flush): compute waits on it
    call: Any = None               # the PinnedCopier call, released (events, pinned ids) once done


_MEMCPY_KIND = {"out": D2H, "in": H2D}   # a pending copy's direction -> its cudaMemcpyKind


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """One [n] int64 array of the tickets' slot arrays, in order (the array itself when one)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_path(path, page_bytes: int) -> str:
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "direct" and not direct_ok(page_bytes):
        raise ValueError(f"path 'direct' needs pages of whole 8-byte words, got {page_bytes} bytes")
    return path


class HostSwap:
    """A pool of host pages (pinned on CUDA, NumPy on the CPU) that device pages swap to.

    ``host``: [num_host_pages, num_layers, 2, page_size, num_kv_heads, head_dim], the pool's dtype.
    Size it by ``num_host_pages`` or by ``num_bytes`` (whole pages). Copies run on two
    non-blocking streams, one per direction, so a swap-out and a swap-in overlap (PCIe is duplex).
    """

    def __init__(self, pool: PagePool, num_host_pages: int | None = None, *, num_bytes: int | None = None,
                 path: str = "auto", min_run_bytes: int = 8 << 20, staging_bytes: int = 256 << 20,
                 copy_kernel: Callable | None = None) -> None:
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, got {type(pool).__name__}")
        if copy_kernel is not None and not callable(copy_kernel):
            raise TypeError(f"copy_kernel must be callable (pagemem.kernels.swap_copy.copy_pages), "
                            f"got {type(copy_kernel).__name__}")
        self.pool = pool
        self.page_bytes = pool.config.page_bytes
        self.num_host_pages = self._host_pages(num_host_pages, num_bytes)
        self.path = _check_path(path, self.page_bytes)
        self.min_run_bytes = check_int(min_run_bytes, "min_run_bytes", 0)
        # at least one page: a staging buffer smaller than a page still stages one page at a time
        self.staging_pages = max(1, check_int(staging_bytes, "staging_bytes", 1) // self.page_bytes)
        self.cuda = pool.device == "cuda"
        shape = (self.num_host_pages, *pool.config.page_shape)
        if self.cuda:
            import cupy as cp
            self._mem = cp.cuda.alloc_pinned_memory(self.num_host_pages * self.page_bytes)
            raw = np.frombuffer(self._mem, dtype=np.uint8, count=self.num_host_pages * self.page_bytes)
            self.host = raw.view(pool.config.np_dtype).reshape(shape)
            word = next(w for w in (8, 4, 2, 1) if self.page_bytes % w == 0)
            # [num_pages, page_bytes // word] unsigned ints: moves bits, never values
            kv_words = pool.kv.reshape(pool.num_pages, -1).view(f"u{word}")
            self._copiers = {d: PinnedCopier(d, kv_words, self.host.ctypes.data, self.page_bytes,
                                             self.staging_pages, copy_kernel=copy_kernel) for d in (D2H, H2D)}
        else:
            self.host = np.zeros(shape, dtype=pool.config.np_dtype)
        self._host_free = np.ones(self.num_host_pages, dtype=bool)
        self._live: set[SwapTicket] = set()      # tickets in state "out"
        self._pending: list[_Pending] = []
        self._staged_out: list[tuple[SwapTicket, list[int]]] = []   # deferred: (ticket, its pages, now free)
        self._staged_in: list[tuple[SwapTicket, list[int]]] = []    # deferred: (spent ticket, its new pages)
        self._bandwidth: dict[str, float | None] = {"out": None, "in": None}
        self.last_copy_s: dict[str, float | None] = {"out": None, "in": None}  # device time of the latest
        self.copy_s = {"out": 0.0, "in": 0.0}    # device seconds of completed copies (CPU: NumPy copies)
        self.num_calls = {"out": 0, "in": 0}     # copies queued: one a call, or a flush's direction
        self.wait_s = 0.0                        # host seconds blocked on copies (wait, reclaim(wait=True))
        self.num_pages_out = self.num_pages_in = 0

    def _host_pages(self, num_host_pages, num_bytes) -> int:
        """The host pool's size in pages from exactly one of the two ways to give it."""
        if (num_host_pages is None) == (num_bytes is None):
            raise ValueError("give exactly one of num_host_pages and num_bytes")
        if num_host_pages is not None:
            return check_int(num_host_pages, "num_host_pages", 1)
        n = check_int(num_bytes, "num_bytes", 1) // self.page_bytes
        if n < 1:
            raise ValueError(f"num_bytes={num_bytes} holds no page of {self.page_bytes} bytes "
                             f"(num_host_pages would be 0)")
        return n

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_free_host_pages(self) -> int:
        return int(np.count_nonzero(self._host_free))

    @property
    def has_deferred(self) -> bool:
        """Whether deferred swaps wait for ``flush`` (their pages must not be written before)."""
        return bool(self._staged_out or self._staged_in)

    def can_swap_out(self, num_pages: int) -> bool:
        """Whether swap_out of ``num_pages`` pages fits in the host pages free now (after a reclaim)."""
        num_pages = check_int(num_pages, "num_pages", 0)
        self.reclaim()
        return num_pages <= self.num_free_host_pages

    def bandwidth(self, direction: str) -> float | None:
        """Achieved bytes/s of completed copies ("out" or "in"), a running mean weighted to the
        latest tickets; None before the first completes. Feeds the preemption cost model."""
        if not isinstance(direction, str) or direction not in self._bandwidth:
            raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")
        return self._bandwidth[direction]

    def _plan(self, device_ids, host_slots) -> CopyPlan:
        return plan_copies(device_ids, host_slots, self.path, self.page_bytes, self.min_run_bytes, self.staging_pages)

    # ---- swap out / in -----------------------------------------------------------------------
    def swap_out(self, page_ids: Sequence[int], stream=None, priority: int = 0, *, defer: bool = False) -> SwapTicket:
        """Copy pages to host and return a ticket at once. The caller's reference to each page
        moves to the ticket; ``reclaim()`` frees the pages (with ``priority``, in reverse order)
        after the copy completes. ``defer``: the pages go back to the pool now (same order) and
        ``flush`` queues the copy (see the module docstring). Raises ValueError (free, shared or
        repeated page), OutOfHostPages (host full, after reclaiming completed copies); either way
        the pages and host slots asked for are untouched."""
        page_ids = self._check_pages(page_ids)
        priority = check_int(priority, "priority")
        defer = _check_flag(defer, "defer")
        self.reclaim()
        n = len(page_ids)
        if n > self.num_free_host_pages:
            raise OutOfHostPages(f"swap_out of {n} pages, {self.num_free_host_pages} of "
                                 f"{self.num_host_pages} host pages free")
        slots = np.flatnonzero(self._host_free)[:n]  # [n] int64, lowest first: host runs stay long
        pend = None
        if not defer:
            plan = self._plan(page_ids, slots)       # made before anything changes
            self.flush(stream)                       # deferred copies first: copies keep their order
            pend = _Pending(None, None, "out", n * self.page_bytes, page_ids=page_ids, priority=priority)
            self._copy(plan, stream, (), pend)       # queued first: the bookkeeping below overlaps it
        self._host_free[slots] = False
        slots.flags.writeable = False
        ticket = SwapTicket(slots.tolist(), n * self.page_bytes, owner=self, slot_array=slots)
        if defer:
            ticket.staged = True
            self._staged_out.append((ticket, page_ids))
            self.pool.free_prechecked(page_ids[::-1], priority)   # flush() copies them before anything writes
        else:
            ticket.event = pend.event
            self._pending.append(pend)
        self._live.add(ticket)
        self.num_pages_out += n
        self.reclaim()
        return ticket

    def swap_in(self, ticket: SwapTicket, stream=None, *, defer: bool = False) -> list[int]:
        """Copy a ticket's pages back into freshly allocated device pages and return their ids
        (refcount 1, owned by the caller, in the order swapped out). ``stream`` (the compute
        stream) waits on the copy. Spends the ticket; its host slots are freed by ``reclaim()``.
        ``defer``: the copy is queued by ``flush`` (the pages hold nothing until then).
        Raises TypeError/ValueError (bad or spent ticket), OutOfPages; either way nothing changed."""
        self._check_ticket(ticket, "swap_in")
        defer = _check_flag(defer, "defer")
        self.reclaim()
        n = ticket.num_pages
        if not self.pool.can_allocate(n):
            raise OutOfPages(f"swap_in of {n} pages, {self.pool.num_free_pages} free")
        if not defer:
            self.flush(stream)                       # deferred copies (this ticket's own among them) first
        page_ids = self.pool.allocate(n)
        if defer:
            self._staged_in.append((ticket, page_ids))
        else:
            pend = _Pending(None, None, "in", ticket.nbytes, host_slots=ticket.slot_array)
            after = () if ticket.is_done() else (ticket.event,)
            self._copy(self._plan(page_ids, ticket.slot_array), stream, after, pend)
            self._pending.append(pend)
        ticket.state = "in"
        self._live.discard(ticket)
        self.num_pages_in += n
        self.reclaim()
        return page_ids

    def flush(self, stream=None) -> int:
        """Queue the deferred swap-outs' copy (one plan over all their pages, in the order they were
        deferred), then the deferred swap-ins' (after the out copies they read), on their copy
        streams; ``stream`` (the compute stream) waits on both. The deferred tickets then share
        the out copy's event. Returns the pages queued; with nothing deferred, does nothing.
        A planning error changes nothing."""
        num = 0
        if self._staged_out:
            staged = self._staged_out
            ids = [p for _, pages in staged for p in pages]
            slots = _joined([t.slot_array for t, _ in staged])
            plan = self._plan(ids, slots)
            pend = _Pending(None, None, "out", len(ids) * self.page_bytes, released=True)
            self._copy(plan, stream, (), pend)
            self._staged_out = []
            for t, _ in staged:
                t.event, t.staged = pend.event, False
            self._pending.append(pend)
            num += len(ids)
        if self._staged_in:
            staged = self._staged_in
            ids = [p for _, pages in staged for p in pages]
            slots = _joined([t.slot_array for t, _ in staged])
            after = tuple({id(t.event): t.event for t, _ in staged if not t.is_done()}.values())
            pend = _Pending(None, None, "in", len(ids) * self.page_bytes, host_slots=slots)
            self._copy(self._plan(ids, slots), stream, after, pend)
            self._staged_in = []
            self._pending.append(pend)
            num += len(ids)
        if num:
            self.reclaim()
        return num

    def discard(self, ticket: SwapTicket) -> None:
        """Drop a swapped-out ticket without swapping in (its sequence was aborted). The host
        slots are freed by ``reclaim()`` once the out copy has completed (at once if its copy
        was deferred and not queued yet: nothing will read them). Spends the ticket."""
        self._check_ticket(ticket, "discard")
        ticket.state = "discarded"
        self._live.discard(ticket)
        if ticket.staged:
            ticket.staged = False
            self._staged_out = [(t, pages) for t, pages in self._staged_out if t is not ticket]
            self._host_free[ticket.slot_array] = True
        else:
            self._pending.append(_Pending(ticket.event, None, "discard", 0, host_slots=ticket.slot_array))
        self.reclaim()

    def reclaim(self, wait: bool = False) -> int:
        """Release what completed copies held: device pages of swap-outs go back to the pool,
        host slots of swap-ins and discards to the host pool. Polls events; ``wait=True`` waits
        on each pending event (those events only, never the device; the time counts in
        ``wait_s``). Deferred calls not flushed are left alone. Returns pages released."""
        if not isinstance(wait, (bool, np.bool_)):
            raise TypeError(f"wait must be a bool, got {type(wait).__name__}")
        released, still = 0, []
        for p in self._pending:
            if p.event is not None and not p.event.done:
                if not wait:
                    still.append(p)
                    continue
                t0 = time.perf_counter()
                p.event.synchronize()
                self.wait_s += time.perf_counter() - t0
            released += len(p.page_ids) + len(p.host_slots)
            self._finish(p)
        self._pending = still
        return released

    def wait(self, ticket: SwapTicket) -> None:
        """Block the host until the ticket's out copy completed (that event only; the time counts
        in ``wait_s``), then reclaim. A deferred ticket's copy is queued first (``flush``)."""
        if not isinstance(ticket, SwapTicket):
            raise TypeError(f"wait: ticket must be a SwapTicket, got {type(ticket).__name__}")
        if ticket.owner is not self:
            raise ValueError("wait: ticket belongs to another HostSwap (another pool)")
        if ticket.staged:
            self.flush()
        if ticket.event is not None:
            t0 = time.perf_counter()
            ticket.event.synchronize()
            self.wait_s += time.perf_counter() - t0
        self.reclaim()

    # ---- internals ---------------------------------------------------------------------------
    def _finish(self, p: _Pending) -> None:
        if p.page_ids:
            self.pool.free_prechecked(p.page_ids[::-1], p.priority)
        if len(p.host_slots):
            self._host_free[p.host_slots] = True
        if p.direction in ("out", "in"):
            seconds = p.seconds
            if p.start is not None:
                import cupy as cp
                seconds = cp.cuda.get_elapsed_time(p.start, p.event) * 1e-3
            if p.call is not None:        # its events and pinned ids serve later calls
                self._copiers[_MEMCPY_KIND[p.direction]].release(p.call)
                p.call = None
            self.last_copy_s[p.direction] = seconds
            self.copy_s[p.direction] += seconds
            if seconds > 0:
                old, new = self._bandwidth[p.direction], p.nbytes / seconds
                self._bandwidth[p.direction] = new if old is None else 0.5 * old + 0.5 * new

    def _check_pages(self, page_ids: Sequence[int]) -> list[int]:
        """Validated ids as a new list of ints. The common case (distinct valid ints at refcount 1)
        costs a few C-level passes (~60 ns a page); anything else gets the checks below, which name
        the first problem."""
        if isinstance(page_ids, (str, bytes)) or not isinstance(page_ids, Sequence):
            raise TypeError(f"page_ids must be a sequence of ints, got {type(page_ids).__name__}")
        if len(page_ids) == 0:
            raise ValueError("page_ids is empty")
        if self.pool.are_private(page_ids):
            return list(page_ids)
        ids = np.array(page_ids)
        if ids.dtype.kind not in "iu" or ids.ndim != 1 or ids.min() < 1 or ids.max() >= self.pool.num_pages:
            self.pool.check_page_ids(page_ids, "page_ids")  # raises, naming the offending id
            raise TypeError("page_ids must be a flat sequence of ints")
        ids = ids.astype(np.int64, copy=False)
        page_ids = ids.tolist()
        srt = np.sort(ids)
        if (srt[1:] == srt[:-1]).any():
            repeated = sorted({int(p) for p in srt[1:][srt[1:] == srt[:-1]]})
            raise ValueError(f"page_ids: pages {repeated} given more than once")
        rcs = operator.itemgetter(*page_ids)(self.pool.refcounts) if len(page_ids) > 1 else (
            self.pool.refcounts[page_ids[0]],)
        if rcs.count(1) != len(rcs):
            p, rc = next((p, rc) for p, rc in zip(page_ids, rcs) if rc != 1)
            if rc == 0:
                raise ValueError(f"page_ids: page {p} is free; only pages in use can be swapped out")
            raise ValueError(f"page_ids: page {p} is shared (refcount {rc}); swapping it would "
                             f"free no memory: keep shared pages resident")
        return page_ids

    def _check_ticket(self, ticket: SwapTicket, what: str) -> None:
        if not isinstance(ticket, SwapTicket):
            raise TypeError(f"{what}: ticket must be a SwapTicket, got {type(ticket).__name__}")
        if ticket.owner is not self:
            raise ValueError(f"{what}: ticket belongs to another HostSwap (another pool)")
        if ticket.state != "out":
            raise ValueError(f"{what}: ticket was already used (state {ticket.state!r})")
        if ticket not in self._live:  # made by hand, or its fields edited: it holds no host pages
            raise ValueError(f"{what}: ticket was not issued by this HostSwap's swap_out")

    def _copy(self, plan: CopyPlan, stream, after, pend: _Pending) -> None:
        """Carry out ``plan`` the way ``pend.direction`` says ("out": device to host, "in": host to
        device). CPU: NumPy copies, done on return (timed with perf_counter). CUDA: queued in one
        burst on that direction's copy stream after ``stream``'s work and the ``after`` events,
        setting pend's timing events and its call (what the copies need until they end);
        ``stream`` waits on a swap-in, or on a swap-out of pages already given back
        (``pend.released``); nothing blocks the host."""
        direction = _MEMCPY_KIND[pend.direction]
        self.num_calls[pend.direction] += 1
        if not self.cuda:
            t0 = time.perf_counter()
            copy_numpy(plan, self.pool.kv, self.host, direction)
            pend.seconds = time.perf_counter() - t0
            return
        import cupy as cp
        compute = stream if stream is not None else cp.cuda.get_current_stream()
        call = self._copiers[direction].enqueue(plan, compute, after, compute_waits=pend.released)
        pend.start, pend.event, pend.call = call.start, call.end, call

    # ---- checks ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise RuntimeError, with the counts, if host slots leak or overlap, or a device page
        held by an in-flight swap-out is not referenced in the pool."""
        held = [s for t in self._live for s in t.host_slots]
        held += [s for p in self._pending if p.direction != "out" for s in p.host_slots.tolist()]
        held += [s for t, _ in self._staged_in for s in t.host_slots]    # spent, copy not queued yet
        free = set(np.flatnonzero(self._host_free).tolist())
        problems = []
        counts = Counter(held)
        if any(c > 1 for c in counts.values()):
            problems.append(f"host slots held twice: {sorted(s for s, c in counts.items() if c > 1)}")
        if free & set(counts):
            problems.append(f"host slots both free and held: {sorted(free & set(counts))}")
        if len(free) + len(counts) != self.num_host_pages:
            problems.append(f"free {len(free)} + held {len(counts)} != {self.num_host_pages} host pages")
        if any(t.state != "out" or t.owner is not self for t in self._live):
            problems.append("a spent or foreign ticket is live")
        if any(t not in self._live or not t.staged for t, _ in self._staged_out) or \
                sum(t.staged for t in self._live) != len(self._staged_out):
            problems.append("deferred swap-outs and staged tickets disagree")
        unref = [p for q in self._pending for p in q.page_ids if self.pool.refcounts[p] < 1]
        if unref:
            problems.append(f"pages {unref} held by in-flight swap-outs have refcount 0")
        if problems:
            raise RuntimeError("HostSwap integrity: " + "; ".join(problems))
