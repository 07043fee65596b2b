"""HostSwap's CUDA copies: a plan made on the host, then one burst of asynchronous CUDA calls.

HostSwap (swap.py) decides who owns which page and host slot; this module only moves bytes.
A call is prepared on the host first (path choice, merged runs, byte addresses, page ids written
to pinned memory, buffers sized, events created) into a list of typed steps (``Copies``,
``Kernel``), so that between recording the copy stream's ``start`` and ``end`` events the host
replays them as CUDA calls back to back and the device timing holds copies, not Python.
Nothing here synchronizes: cudaMemcpyAsync on explicit streams, event records and waits, and
kernels (take, scatter, the direct page copy) queued on the copy stream.

The "direct" path is one kernel that moves scattered pages between the pool and pinned host
memory itself: pinned memory is mapped into the device's address space (unified addressing), so
the kernel's loads or stores cross PCIe with no staging buffer and no separate copy.

    plan_copies(ids, slots, ...)     NumPy only: which path, and the runs in page units (CPU-tested)
    copy_numpy(plan, kv, host, ...)  the CPU HostSwap: the plan carried out with NumPy copies
    PinnedCopier.enqueue(plan, ...)  CUDA only: one direction's copies on its own stream
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np

D2H, H2D = 2, 1  # cudaMemcpyKind


def merge_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both ``src`` and ``dst`` advance by one."""
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if len(s) == 0:
        return []
    brk = _breaks(s)
    brk |= _breaks(d)
    return _runs(s, d, brk)


def _breaks(a: np.ndarray) -> np.ndarray:
    """[n + 1] bool, True where a run starts (at 0, and where ``a`` does not advance by one), and at n."""
    brk = np.ones(len(a) + 1, dtype=bool)
    np.not_equal(a[1:] - a[:-1], 1, out=brk[1:-1])
    return brk


def _runs(src: np.ndarray | None, dst: np.ndarray, brk: np.ndarray) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of the runs ``brk`` separates; ``src`` None: positions."""
    edges = brk.nonzero()[0]                                    # [num_runs + 1]: run starts, then n
    starts = edges[:-1]
    first = starts if src is None else src[starts]
    return list(zip(first.tolist(), dst[starts].tolist(), (edges[1:] - starts).tolist()))


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """One swap call's copies in page units: no pointers, no CUDA.

    "runs":   ``runs`` = (device page, host slot, num_pages), one cudaMemcpyAsync each.
    "direct": one kernel copies page ``ids[i]`` to or from host slot ``slots[i]`` for every i.
    "gather": positions go through a staging buffer of ``staging_pages`` pages, chunk by chunk
              (chunk c = positions [c * staging_pages, (c + 1) * staging_pages)). ``runs`` =
              (position, host slot, num_pages), never crossing a chunk; chunk c owns
              runs[bounds[c]:bounds[c + 1]]. D2H: gather kv[ids[chunk]] into staging, then copy
              each run from staging row position % staging_pages; H2D: the reverse, then scatter.
    """

    path: str
    ids: np.ndarray                      # [n] int64 device page ids, in swap order
    runs: list[tuple[int, int, int]]
    bounds: list[int]                    # gather: [num_chunks + 1] indexes into runs; runs: []
    staging_pages: int
    slots: np.ndarray | None = None      # direct: [n] int64 host slots, in swap order


def _int64(a) -> np.ndarray:
    """[n] int64 of a sequence of ints (a Python list converted in one pass, no copy of an int64 array)."""
    if isinstance(a, np.ndarray):
        return a if a.dtype == np.int64 else a.astype(np.int64)
    return np.fromiter(a, np.int64, len(a))


def direct_ok(page_bytes: int) -> bool:
    """Whether the direct kernel can move pages of ``page_bytes`` (whole 8-byte words)."""
    return page_bytes % 8 == 0


def plan_copies(ids: Sequence[int], slots: Sequence[int], path: str, page_bytes: int,
                min_run_bytes: int, staging_pages: int) -> CopyPlan:
    """The plan for copying device pages ``ids`` to or from host ``slots`` (same length, >= 1).
    ``path="auto"``: "runs" when the mean merged run (both sides advancing by one) holds at least
    ``min_run_bytes``, else "gather". "direct" is chosen by name only (see HostSwap)."""
    ids, slots = _int64(ids), _int64(slots)                     # [n], [n]
    if path == "direct" and not direct_ok(page_bytes):
        raise ValueError(f"path 'direct' needs pages of whole 8-byte words, got {page_bytes} bytes")
    if path == "direct":
        return CopyPlan("direct", ids, [], [], staging_pages, slots)
    n, host_brk = len(ids), _breaks(slots)                     # [n + 1] the host side breaks runs
    # "auto" below min_run_bytes in all: no mean run can reach it, so the device side is not looked at
    if path == "runs" or (path == "auto" and n * page_bytes >= min_run_bytes):
        brk = _breaks(ids)
        brk |= host_brk                                         # either side breaks runs
        num_runs = max(1, int(np.count_nonzero(brk)) - 1)
        if path == "runs" or n * page_bytes >= num_runs * min_run_bytes:
            return CopyPlan("runs", ids, _runs(ids, slots, brk), [], staging_pages)
    host_brk[staging_pages::staging_pages] = True              # chunk edges break runs too
    runs = _runs(None, slots, host_brk)
    if n <= staging_pages:
        bounds = [0, len(runs)]
    else:
        bounds = np.searchsorted([r[0] for r in runs], np.arange(0, n, staging_pages)).tolist() + [len(runs)]
    return CopyPlan("gather", ids, runs, bounds, staging_pages)


def copy_numpy(plan: CopyPlan, kv: np.ndarray, host: np.ndarray, direction: int) -> None:
    """Carry out ``plan`` with NumPy copies, as PinnedCopier does with CUDA calls: "runs" one slice
    copy a run, "gather" chunk by chunk through a staging buffer (``kv[ids]`` taken into it, then
    one copy a host run; H2D the reverse, then scattered), "direct" one fancy-indexed copy.
    kv: [num_pages, ...] and host: [num_host_pages, ...], page-major; writes host (D2H) or kv (H2D)."""
    if plan.path == "direct":
        if direction == D2H:
            host[plan.slots] = kv[plan.ids]
        else:
            kv[plan.ids] = host[plan.slots]
        return
    if plan.path == "runs":
        for d, h, k in plan.runs:
            if direction == D2H:
                host[h:h + k] = kv[d:d + k]
            else:
                kv[d:d + k] = host[h:h + k]
        return
    n, m = len(plan.ids), plan.staging_pages
    stage = np.empty((min(n, m), *kv.shape[1:]), kv.dtype)        # [min(n, staging_pages), ...]
    for c, c0 in enumerate(range(0, n, m)):                        # chunk c: positions [c0, c0 + k)
        ids = plan.ids[c0:c0 + m]
        k = len(ids)
        if direction == D2H:
            np.take(kv, ids, axis=0, out=stage[:k])
        for i, h, r in plan.runs[plan.bounds[c]:plan.bounds[c + 1]]:
            if direction == D2H:
                host[h:h + r] = stage[i - c0:i - c0 + r]
            else:
                stage[i - c0:i - c0 + r] = host[h:h + r]
        if direction == H2D:
            kv[ids] = stage[:k]


@dataclass(eq=False, slots=True)
class CopyCall:
    """One enqueued call: its timing events (``end`` completes when its copies have) and what
    must live until then. Handed back to ``PinnedCopier.release`` once ``end`` completed, which
    reuses the events and the pinned id buffer for later calls."""

    start: Any
    end: Any
    pinned: Any = None       # (pinned memory, [capacity] int64 view) the call's ids went through
    keep: tuple = ()         # outgrown device id buffers queued kernels may still read


@dataclass(frozen=True, slots=True)
class Copies:
    """cudaMemcpyAsync(dst, src, nbytes, direction) on the copy stream for each (dst, src,
    nbytes) of ``calls`` (addresses as ints; plain tuples: a call may hold thousands)."""

    direction: int
    calls: list[tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class Kernel:
    """Device work queued on the copy stream by calling ``run()`` under it (a raw kernel
    launch, the copy kernel, or a CuPy take / indexed assignment)."""

    run: Callable[[], Any]


Step = Union[Copies, Kernel]


class PinnedCopier:
    """One direction (D2H or H2D) of HostSwap's copies: its non-blocking stream, and the buffers
    only that stream touches, so stream order makes reusing them safe: the staging pages, the
    device page-id buffer, the ``ready`` event. Per call nothing is allocated once warm: timing
    events and pinned id buffers come from free lists that ``release`` refills. ``kv_words``: the
    pool as [num_pages, page words] unsigned ints; ``host_ptr``: address of host page 0 (pinned);
    ``copy_kernel``: ``pagemem.kernels.swap_copy.copy_pages`` or None (CuPy take / indexed
    assignment); ``cp``: the cupy module (tests pass a stand-in that records the calls)."""

    def __init__(self, direction: int, kv_words: Any, host_ptr: int, page_bytes: int, staging_pages: int,
                 cp: Any = None, copy_kernel: Any = None) -> None:
        if cp is None:
            import cupy as cp
        self.cp, self.direction, self.kv_words, self.host_ptr = cp, direction, kv_words, host_ptr
        self.page_bytes, self.staging_pages, self.copy_kernel = page_bytes, staging_pages, copy_kernel
        self.stream = cp.cuda.Stream(non_blocking=True)
        # Reused per call: a wait on an event waits for the record made before the wait was queued.
        self.ready = cp.cuda.Event(disable_timing=True)
        self._stage = None   # [staging_pages, page words], at the first gathered call
        self._idx = None     # [capacity] int64 device page ids (direct: source then destination rows)
        self._direct = None  # {vector bytes: kernel}, at the first direct call
        self._sms = None
        self._free_events: list[tuple[Any, Any]] = []   # (start, end) pairs of completed calls
        self._free_pinned: list[tuple[Any, np.ndarray]] = []   # pinned int64 id buffers of completed calls

    def enqueue(self, plan: CopyPlan, compute, after: Sequence = (), compute_waits: bool = False) -> CopyCall:
        """Queue ``plan``'s copies on this stream after the work queued on ``compute`` so far and
        the ``after`` events; an H2D (or, with ``compute_waits``, a D2H whose pages were already
        handed out again) makes ``compute`` wait on them. Returns the call; give it to ``release``
        once its ``end`` event completed."""
        steps, pinned, keep = self._prepare(plan)
        start, end = self._free_events.pop() if self._free_events else (self.cp.cuda.Event(), self.cp.cuda.Event())
        memcpy, sp = self.cp.cuda.runtime.memcpyAsync, self.stream.ptr
        # ---- the burst: CUDA calls only, from here to end.record ----
        self.ready.record(compute)   # D2H reads after the last kernel that wrote; H2D writes after the last reader
        self.stream.wait_event(self.ready)
        for ev in after:
            self.stream.wait_event(ev)
        start.record(self.stream)
        with self.stream:
            for step in steps:
                if type(step) is Copies:
                    for dst, src, nbytes in step.calls:
                        memcpy(dst, src, nbytes, step.direction, sp)
                else:
                    step.run()
        end.record(self.stream)
        if self.direction == H2D or compute_waits:
            compute.wait_event(end)
        return CopyCall(start, end, pinned, keep)

    def release(self, call: CopyCall) -> None:
        """Take back a completed call's events and pinned buffer for later calls (its ``end`` has
        completed, so nothing queued still reads them)."""
        self._free_events.append((call.start, call.end))
        if call.pinned is not None:
            self._free_pinned.append(call.pinned)
        call.pinned, call.keep = None, ()

    def _pinned_ids(self, count: int) -> tuple[Any, np.ndarray]:
        """A pinned buffer of at least ``count`` int64 from the free list, else a new one (at
        least 1024, so that calls of a few pages share one). Not reused until its call is released."""
        for i, (mem, view) in enumerate(self._free_pinned):
            if len(view) >= count:
                return self._free_pinned.pop(i)
        size = max(count, 1024, 2 * max((len(v) for _, v in self._free_pinned), default=0))
        mem = self.cp.cuda.alloc_pinned_memory(8 * size)
        return mem, np.frombuffer(mem, dtype=np.int64, count=size)

    def _prepare(self, plan: CopyPlan) -> tuple[list[Step], Any, tuple]:
        """The host side of a call: its steps in stream order, the pinned id buffer it uses (or
        None) and what must stay alive until it ends (outgrown device buffers)."""
        if plan.path == "runs":
            dptr, pb = self.kv_words.data.ptr, self.page_bytes
            return [self._copies([(dptr + d * pb, self.host_ptr + h * pb, k * pb) for d, h, k in plan.runs])], None, ()
        if plan.path == "direct":
            return self._prepare_direct(plan)
        return self._prepare_gather(plan)

    def _copies(self, pairs: list[tuple[int, int, int]]) -> Copies:
        """(device address, host address, nbytes) copies in this copier's direction."""
        if self.direction == H2D:
            return Copies(H2D, pairs)
        return Copies(D2H, [(h, d, b) for d, h, b in pairs])

    def _prepare_direct(self, plan: CopyPlan) -> tuple[list[Step], Any, tuple]:
        """Host side of a direct call: the upload of [source rows | destination rows] from pinned
        memory, then the kernel; the pinned buffer; what to keep alive.
        The grid is at most two blocks an SM, looping over the words (H100, 2026-11-27 00:03 UTC:
        capped at 16, 32 or 64 blocks it moved less and slowed a kernel beside it more)."""
        n = len(plan.ids)
        pinned = self._pinned_ids(2 * n)
        rows = pinned[1]
        src, dst = (plan.ids, plan.slots) if self.direction == D2H else (plan.slots, plan.ids)
        rows[:n], rows[n:2 * n] = src, dst
        keep = self._grow_idx(2 * n)
        if self._direct is None:
            self._direct = _direct_kernels(self.cp)
        vec = 16 if self.page_bytes % 16 == 0 else 8
        words = self.page_bytes // vec
        kv, host = self.kv_words.data.ptr, self.host_ptr
        src_ptr, dst_ptr = (kv, host) if self.direction == D2H else (host, kv)
        blocks = max(1, min(-(-n * words // DIRECT_THREADS), DIRECT_BLOCKS_PER_SM * self._num_sms()))
        args = (np.uint64(src_ptr), np.uint64(dst_ptr), self._idx, np.int64(n), np.int64(words))
        launch = functools.partial(self._direct[vec], (blocks,), (DIRECT_THREADS,), args)
        return [Copies(H2D, [(self._idx.data.ptr, rows.ctypes.data, 16 * n)]), Kernel(launch)], pinned, keep

    def _num_sms(self) -> int:
        if self._sms is None:
            self._sms = int(self.cp.cuda.Device().attributes["MultiProcessorCount"])
        return self._sms

    def _grow_idx(self, n: int) -> tuple:
        """Make the device id buffer hold ``n`` int64; returns the outgrown buffer to keep alive
        (queued kernels may still read it), or ()."""
        capacity = 0 if self._idx is None else len(self._idx)
        if capacity >= n:
            return ()
        old = () if self._idx is None else (self._idx,)
        with self.stream:  # allocations from this stream's memory pool: reused in stream order
            self._idx = self.cp.empty(max(n, 2 * capacity), self.cp.int64)
        return old

    def _prepare_gather(self, plan: CopyPlan) -> tuple[list[Step], Any, tuple]:
        """Host side of a gathered call: the page-id upload (unless a copy kernel reads the ids in
        pinned memory itself), then chunk by chunk the gather and the host runs' copies (H2D: the
        copies, then the scatter); the pinned id buffer; what to keep alive. The ids go through
        pinned memory (a pageable upload would block the host until the stream drains), a buffer
        reused once its call is released."""
        cp = self.cp
        n, m, pb = len(plan.ids), self.staging_pages, self.page_bytes
        pinned = self._pinned_ids(n)
        pinned[1][:n] = plan.ids
        if self._stage is None:
            with self.stream:  # allocations from this stream's memory pool: reused in stream order
                self._stage = cp.empty((m, self.kv_words.shape[1]), self.kv_words.dtype)
        keep, steps = (), []
        if self.copy_kernel is None:
            keep = self._grow_idx(n)
            steps.append(Copies(H2D, [(self._idx.data.ptr, pinned[1].ctypes.data, 8 * n)]))
        sptr, hptr = self._stage.data.ptr, self.host_ptr
        for c, c0 in enumerate(range(0, n, m)):   # chunk c: positions [c0, c0 + k)
            k = min(m, n - c0)
            copies = self._copies([(sptr + (i - c0) * pb, hptr + h * pb, r * pb)
                                   for i, h, r in plan.runs[plan.bounds[c]:plan.bounds[c + 1]]])
            rows = pinned[1].ctypes.data + 8 * c0          # ids[c0:], read there by a copy kernel
            if self.direction == D2H:
                steps += [Kernel(self._gather_op(c0, k, rows)), copies]
            else:
                steps += [copies, Kernel(self._scatter_op(c0, k, rows))]
        return steps, pinned, keep

    def _gather_op(self, c0: int, k: int, rows: int):
        """Pool pages ids[c0:c0 + k] (pinned at ``rows``) -> staging rows [0, k), a call for the burst."""
        if self.copy_kernel is not None:
            return functools.partial(self.copy_kernel, self.kv_words.data.ptr, self._stage.data.ptr, rows, 0, k,
                                     self.page_bytes, self.stream)
        return functools.partial(self.cp.take, self.kv_words, self._idx[c0:c0 + k], 0, self._stage[:k])

    def _scatter_op(self, c0: int, k: int, rows: int):
        """Staging rows [0, k) -> pool pages ids[c0:c0 + k] (pinned at ``rows``), a call for the burst."""
        if self.copy_kernel is not None:
            return functools.partial(self.copy_kernel, self._stage.data.ptr, self.kv_words.data.ptr, 0, rows, k,
                                     self.page_bytes, self.stream)
        return functools.partial(self.kv_words.__setitem__, self._idx[c0:c0 + k], self._stage[:k])


DIRECT_THREADS = 256
DIRECT_BLOCKS_PER_SM = 2
_DIRECT_SRC = r"""
template <typename T>
__device__ void copy_pages(const T* __restrict__ src, T* __restrict__ dst, const long long* __restrict__ rows,
                           long long n, long long words) {
    // Page rows[r] of src -> page rows[n + r] of dst, ``words`` T each; one T per thread per pass.
    const long long total = n * words, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long r = i / words, w = i - r * words;
        dst[rows[n + r] * words + w] = src[rows[r] * words + w];
    }
}
extern "C" __global__ void pagemem_copy_pages_16(const ulonglong2* src, ulonglong2* dst, const long long* rows,
                                                 long long n, long long words) {
    copy_pages(src, dst, rows, n, words);
}
extern "C" __global__ void pagemem_copy_pages_8(const unsigned long long* src, unsigned long long* dst,
                                                const long long* rows, long long n, long long words) {
    copy_pages(src, dst, rows, n, words);
}
"""


def _direct_kernels(cp) -> dict:
    """{vector bytes: the page-copy kernel moving that many bytes per thread and pass}."""
    module = cp.RawModule(code=_DIRECT_SRC, options=("-std=c++17",))
    return {16: module.get_function("pagemem_copy_pages_16"), 8: module.get_function("pagemem_copy_pages_8")}
