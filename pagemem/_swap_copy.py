"""HostSwap's CUDA copies: a plan made on the host, then one burst of asynchronous CUDA calls.

HostSwap (swap.py) decides who owns which page and host slot; this module only moves bytes.
A call is prepared on the host first (path choice, merged runs, byte addresses, page ids written
to pinned memory, buffers sized, events created), so that between recording the copy stream's
``start`` and ``end`` events the host issues CUDA calls back to back and the device timing holds
copies, not Python. Nothing here synchronizes: cudaMemcpyAsync on explicit streams, event
records and waits, and kernels (take, scatter, the direct page copy) queued on the copy stream.

The "direct" path is one kernel that moves scattered pages between the pool and pinned host
memory itself: pinned memory is mapped into the device's address space (unified addressing), so
the kernel's loads or stores cross PCIe with no staging buffer and no separate copy.

    plan_copies(ids, slots, ...)  NumPy only: which path, and the runs in page units (CPU-tested)
    copy_numpy(plan, kv, host)    the CPU HostSwap: the plan carried out with NumPy copies
    CopyEngine.enqueue(plan, ...) CUDA only: one direction's copies on its own stream
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


def direct_ok(page_bytes: int) -> bool:
    """Whether the direct kernel can move pages of ``page_bytes`` (whole 8-byte words)."""
    return page_bytes % 8 == 0


def plan_copies(ids: Sequence[int], slots: Sequence[int], path: str, page_bytes: int,
                min_run_bytes: int, staging_pages: int) -> CopyPlan:
    """The plan for copying device pages ``ids`` to or from host ``slots`` (same length, >= 1).
    ``path="auto"``: "runs" when the mean merged run (both sides advancing by one) holds at least
    ``min_run_bytes``, else "gather". "direct" is chosen by name only (see HostSwap)."""
    ids, slots = np.asarray(ids, dtype=np.int64), np.asarray(slots, dtype=np.int64)  # [n], [n]
    if path == "direct" and not direct_ok(page_bytes):
        raise ValueError(f"path 'direct' needs pages of whole 8-byte words, got {page_bytes} bytes")
    if path == "direct":
        return CopyPlan("direct", ids, [], [], staging_pages, slots)
    n, host_brk = len(ids), _breaks(slots)                     # [n + 1] the host side breaks runs
    if path != "gather":
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


def copy_numpy(plan: CopyPlan, kv: np.ndarray, host: np.ndarray, kind: int) -> None:
    """Carry out ``plan`` with NumPy copies, as CopyEngine does with CUDA calls: "runs" one slice
    copy a run, "gather" chunk by chunk through a staging buffer (``kv[ids]`` taken into it, then
    one copy a host run; H2D the reverse, then scattered), "direct" one fancy-indexed copy.
    kv: [num_pages, ...] and host: [num_host_pages, ...], page-major; writes host (D2H) or kv (H2D)."""
    if plan.path == "direct":
        if kind == D2H:
            host[plan.slots] = kv[plan.ids]
        else:
            kv[plan.ids] = host[plan.slots]
        return
    if plan.path == "runs":
        for d, h, k in plan.runs:
            if kind == D2H:
                host[h:h + k] = kv[d:d + k]
            else:
                kv[d:d + k] = host[h:h + k]
        return
    n, m = len(plan.ids), plan.staging_pages
    stage = np.empty((min(n, m), *kv.shape[1:]), kv.dtype)        # [min(n, staging_pages), ...]
    for c, c0 in enumerate(range(0, n, m)):                        # chunk c: positions [c0, c0 + k)
        ids = plan.ids[c0:c0 + m]
        k = len(ids)
        if kind == D2H:
            np.take(kv, ids, axis=0, out=stage[:k])
        for i, h, r in plan.runs[plan.bounds[c]:plan.bounds[c + 1]]:
            if kind == D2H:
                host[h:h + r] = stage[i - c0:i - c0 + r]
            else:
                stage[i - c0:i - c0 + r] = host[h:h + r]
        if kind == H2D:
            kv[ids] = stage[:k]


class CopyEngine:
    """One direction (D2H or H2D) of HostSwap's copies: its non-blocking stream, and the buffers
    only that stream touches, so stream order makes reusing them safe: the staging pages, the
    device page-id buffer, the ``ready`` event. ``kv_words``: the pool as [num_pages, page words]
    unsigned ints; ``host_ptr``: address of host page 0 (pinned); ``cp``: the cupy module (tests
    pass a stand-in that records the calls)."""

    def __init__(self, kind: int, kv_words: Any, host_ptr: int, page_bytes: int, staging_pages: int,
                 cp: Any = None) -> None:
        if cp is None:
            import cupy as cp
        self.cp, self.kind, self.kv_words, self.host_ptr = cp, kind, kv_words, host_ptr
        self.page_bytes, self.staging_pages = page_bytes, staging_pages
        self.stream = cp.cuda.Stream(non_blocking=True)
        # Reused per call: a wait on an event waits for the record made before the wait was queued.
        self.ready = cp.cuda.Event(disable_timing=True)
        self._stage = None   # [staging_pages, page words], at the first gathered call
        self._idx = None     # [capacity] int64 device page ids (direct: source then destination rows)
        self._direct = None  # {vector bytes: kernel}, at the first direct call
        self._sms = None

    def enqueue(self, plan: CopyPlan, compute, after: Sequence = ()) -> tuple[Any, Any, tuple]:
        """Queue ``plan``'s copies on this stream after the work queued on ``compute`` so far and
        the ``after`` events; an H2D makes ``compute`` wait on them. Returns (start, end, keep):
        timing events around the copies and what must live until ``end`` completes."""
        cp = self.cp
        direct = None
        if plan.path == "runs":
            dptr, pb = self.kv_words.data.ptr, self.page_bytes
            pairs = [(dptr + d * pb, self.host_ptr + h * pb, k * pb) for d, h, k in plan.runs]
            chunks, keep, upload = [(None, None, self._oriented(pairs))], (), None
        elif plan.path == "direct":
            chunks, (direct, keep, upload) = [], self._prepare_direct(plan)
        else:
            chunks, keep, upload = self._prepare_gather(plan)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        memcpy, sp, kind, kv = cp.cuda.runtime.memcpyAsync, self.stream.ptr, self.kind, self.kv_words
        # ---- the burst: CUDA calls only, from here to end.record ----
        self.ready.record(compute)   # D2H reads after the last kernel that wrote; H2D writes after the last reader
        self.stream.wait_event(self.ready)
        for ev in after:
            self.stream.wait_event(ev)
        start.record(self.stream)
        if upload is not None:
            memcpy(*upload, H2D, sp)
        with self.stream:
            if direct is not None:
                direct[0](*direct[1:])
            for idx, stage, calls in chunks:
                if idx is not None and kind == D2H:
                    cp.take(kv, idx, axis=0, out=stage)
                for dst, src, nbytes in calls:
                    memcpy(dst, src, nbytes, kind, sp)
                if idx is not None and kind == H2D:
                    kv[idx] = stage
        end.record(self.stream)
        if kind == H2D:
            compute.wait_event(end)
        return start, end, keep

    def _oriented(self, pairs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """(device address, host address, nbytes) -> memcpyAsync's (dst, src, nbytes) for this direction."""
        return pairs if self.kind == H2D else [(h, d, b) for d, h, b in pairs]

    def _prepare_direct(self, plan: CopyPlan) -> tuple[tuple, tuple, tuple]:
        """Host side of a direct call: the kernel launch as (function, grid, block, args), what
        to keep alive, and the upload of [source rows | destination rows] through pinned memory.
        The grid is at most two blocks an SM, looping over the words (H100, 2026-11-27 00:03 UTC:
        capped at 16, 32 or 64 blocks it moved less and slowed a kernel beside it more)."""
        cp = self.cp
        n = len(plan.ids)
        pinned = cp.cuda.alloc_pinned_memory(16 * n)
        rows = np.frombuffer(pinned, dtype=np.int64, count=2 * n)
        src, dst = (plan.ids, plan.slots) if self.kind == D2H else (plan.slots, plan.ids)
        rows[:n], rows[n:] = src, dst
        keep: tuple = (pinned,)
        keep += self._grow_idx(2 * n)
        if self._direct is None:
            self._direct = _direct_kernels(cp)
        vec = 16 if self.page_bytes % 16 == 0 else 8
        words = self.page_bytes // vec
        kv, host = self.kv_words.data.ptr, self.host_ptr
        src_ptr, dst_ptr = (kv, host) if self.kind == D2H else (host, kv)
        blocks = max(1, min(-(-n * words // DIRECT_THREADS), DIRECT_BLOCKS_PER_SM * self._num_sms()))
        args = (np.uint64(src_ptr), np.uint64(dst_ptr), self._idx, np.int64(n), np.int64(words))
        return (self._direct[vec], (blocks,), (DIRECT_THREADS,), args), keep, (self._idx.data.ptr, pinned.ptr, 16 * n)

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

    def _prepare_gather(self, plan: CopyPlan) -> tuple[list, tuple, tuple]:
        """Host side of a gathered call: chunks as (ids view, staging view, memcpy args), what to
        keep alive, and the page-id upload's (dst, src, nbytes). The ids go up through pinned
        memory: a pageable upload would block the host until the stream drains. Each call gets its
        own pinned buffer (CuPy's pinned pool caches them), since an earlier call's upload may
        still be reading its own."""
        cp = self.cp
        n, m, pb = len(plan.ids), self.staging_pages, self.page_bytes
        pinned = cp.cuda.alloc_pinned_memory(8 * n)
        np.frombuffer(pinned, dtype=np.int64, count=n)[:] = plan.ids
        keep: tuple = (pinned,)
        with self.stream:  # allocations from this stream's memory pool: reused in stream order
            if self._stage is None:
                self._stage = cp.empty((m, self.kv_words.shape[1]), self.kv_words.dtype)
        keep += self._grow_idx(n)
        sptr, hptr, runs, bounds = self._stage.data.ptr, self.host_ptr, plan.runs, plan.bounds
        chunks = []
        for c, c0 in enumerate(range(0, n, m)):   # chunk c: positions [c0, c0 + k)
            k = min(m, n - c0)
            pairs = [(sptr + (i - c0) * pb, hptr + h * pb, r * pb) for i, h, r in runs[bounds[c]:bounds[c + 1]]]
            chunks.append((self._idx[c0:c0 + k], self._stage[:k], self._oriented(pairs)))
        return chunks, keep, (self._idx.data.ptr, pinned.ptr, 8 * n)


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
