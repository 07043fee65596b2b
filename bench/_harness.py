"""Shared benchmark harness: device detection, GPU timing, and the ceilings every figure is
compared against (device copy bandwidth, pinned PCIe bandwidth), measured in the same run.

Sections are appended per suite; keep helpers here rather than copying them between files.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from pagemem.backend import cuda_unavailable_reason


def has_cuda() -> bool:
    return cuda_unavailable_reason() is None


requires_cuda = pytest.mark.skipif(not has_cuda(), reason=f"needs CUDA: {cuda_unavailable_reason()}")


def gpu_timed(fn, stream=None):
    """Wrap ``fn`` so the CPU timer of pytest-benchmark waits for the GPU work it enqueued."""
    import cupy as cp
    stream = stream or cp.cuda.get_current_stream()

    def timed():
        r = fn()
        stream.synchronize()
        return r
    return timed


def cuda_event_time_ms(fn, iters: int = 20, warmup: int = 3, stream=None) -> float:
    """Median time of ``fn`` in ms, measured with CUDA events around each call."""
    import cupy as cp
    stream = stream or cp.cuda.get_current_stream()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


@functools.cache
def device_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import cupy as cp
    src = cp.empty(nbytes // 2, dtype=cp.uint8)
    dst = cp.empty_like(src)
    ms = cuda_event_time_ms(lambda: dst.__setitem__(slice(None), src), iters=10)
    del src, dst
    return nbytes / (ms * 1e-3)


@functools.cache
def pinned_bandwidth(nbytes: int = 1 << 30) -> tuple[float, float]:
    """(host->device, device->host) bytes/s of one large pinned copy: the PCIe ceiling."""
    import cupy as cp
    host = cp.cuda.alloc_pinned_memory(nbytes)
    h = np.frombuffer(host, dtype=np.uint8, count=nbytes)
    d = cp.empty(nbytes, dtype=cp.uint8)
    h2d = cuda_event_time_ms(lambda: d.set(h), iters=5)
    d2h = cuda_event_time_ms(lambda: d.get(out=h), iters=5)
    del d
    return nbytes / (h2d * 1e-3), nbytes / (d2h * 1e-3)


def device_name() -> str:
    if not has_cuda():
        import platform
        return f"CPU ({platform.processor() or platform.machine()})"
    import cupy as cp
    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()


# ---- host bookkeeping baselines, timed in the same groups as the pool's own calls ----------------
class LinkedFreeList:
    """vLLM's free-list design (FreeKVCacheBlockQueue in vllm/v1/core/kv_cache_utils.py): a doubly
    linked list of free pages with O(1) pop from the front, append at the back and removal from the
    middle (a prefix-cache hit reviving a page). Sketched here over two Python lists of neighbour
    ids instead of block objects; 0 is the list's head and tail sentinel, as NULL_PAGE is never free."""

    def __init__(self, num_pages: int) -> None:
        # free list 0 -> 1 -> 2 -> ... -> num_pages - 1 -> 0 (sentinel at both ends)
        self.prev = [num_pages - 1, *range(0, num_pages - 1)]   # prev[p]; prev[1] = 0 (the sentinel)
        self.next = [*range(1, num_pages), 0]                   # next[p]; next[num_pages - 1] = 0
        self.size = num_pages - 1

    def popleft(self) -> int:
        p = self.next[0]
        self.remove(p)
        return p

    def remove(self, p: int) -> None:
        a, b = self.prev[p], self.next[p]
        self.next[a], self.prev[b] = b, a
        self.size -= 1

    def append(self, p: int) -> None:
        last = self.prev[0]
        self.next[last], self.prev[p], self.next[p], self.prev[0] = p, last, 0, p
        self.size += 1


class ListPool:
    """The same allocate/free contract as PagePool's clean-page path with the plainest structures:
    a Python list as a LIFO free stack and a list of refcounts, no checks, no prefix cache."""

    def __init__(self, num_pages: int) -> None:
        self.free_pages = list(range(num_pages - 1, 0, -1))
        self.refcount = [0] * num_pages

    def allocate(self, n: int) -> list[int]:
        pages = self.free_pages[-n:][::-1]
        del self.free_pages[-n:]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            self.refcount[p] = 0
        self.free_pages.extend(reversed(pages))


class LinkedPool:
    """allocate/free over LinkedFreeList with refcounts: vLLM's bookkeeping shape, without checks."""

    def __init__(self, num_pages: int) -> None:
        self.queue, self.refcount = LinkedFreeList(num_pages), [0] * num_pages

    def allocate(self, n: int) -> list[int]:
        pages = [self.queue.popleft() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            self.refcount[p] = 0
            self.queue.append(p)


BASELINE_POOLS = {"python-list": ListPool, "vllm-linked-list": LinkedPool}


# ---- HostSwap's CUDA branch on the CPU: a CuPy stand-in whose CUDA calls do nothing ---------------
class DevArray(np.ndarray):
    """NumPy memory posing as a CuPy array: ``.data.ptr`` is its address."""

    @property
    def data(self):
        from types import SimpleNamespace
        return SimpleNamespace(ptr=self.ctypes.data)


class NullCupy:
    """The CuPy calls HostSwap's CUDA branch makes (streams, events, memcpyAsync, pinned memory,
    take, empty), each doing nothing but what Python must: what is timed over it is pagemem's own
    host work of a CUDA call, without the driver's. ``calls`` counts the CUDA calls made."""

    int64 = np.int64

    def __init__(self) -> None:
        from types import SimpleNamespace
        null = self
        self.calls = 0

        class Stream:
            ptr = 1

            def __init__(self, non_blocking=False):
                pass

            def wait_event(self, event):
                null.calls += 1

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Event:
            done = True

            def __init__(self, disable_timing=False, block=False):
                pass

            def record(self, stream=None):
                null.calls += 1

            def synchronize(self):
                pass

        def memcpy(dst, src, nbytes, kind, stream):
            null.calls += 1

        class Device:
            id = 0
            attributes = {"MultiProcessorCount": 132}

        self.cuda = SimpleNamespace(Stream=Stream, Event=Event, Device=Device, get_current_stream=Stream,
                                    alloc_pinned_memory=bytearray, get_elapsed_time=lambda start, end: 1.0,
                                    runtime=SimpleNamespace(memcpyAsync=memcpy))

    def empty(self, shape, dtype):
        return np.zeros(shape, dtype=dtype).view(DevArray)     # ids read as page 0 by the scatter

    def take(self, a, indices, axis, out):
        self.calls += 1


def null_copy_kernel(src_ptr, dst_ptr, src_rows_ptr, dst_rows_ptr, num_pages, page_bytes, stream=None) -> None:
    """Stands in for pagemem.kernels.swap_copy.copy_pages over NullCupy: the launch, doing nothing."""
