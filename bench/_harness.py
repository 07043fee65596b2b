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
