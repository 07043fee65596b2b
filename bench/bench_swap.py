"""HostSwap GB/s against the PCIe ceiling and vLLM v0's per-page, per-layer copies (GPU only).

Shapes are named after real models; pages are scattered (a random permutation of the pool) so
neither side merges into long runs by luck. Every figure is end to end: Python bookkeeping and
enqueue included, host clock stopped after the copy's event (or the stream) completed.
"Back-to-back" rows issue K calls in a row, as a scheduler preempting several sequences does:
the host work of each call overlaps the copies of the calls before it.

Run:  pytest bench/bench_swap.py --benchmark-group-by=group   (pytest-benchmark tables)
      PYTHONPATH=. python bench/bench_swap.py [results.json]   (every figure of one run, one table)
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script or under pytest; last, so installed packages win
from bench._harness import cuda_event_time_ms, device_name, has_cuda, pinned_bandwidth, requires_cuda  # noqa: E402
from pagemem import HostSwap, PagePool, PoolConfig  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(page_size=16, num_layers=16, num_kv_heads=8, head_dim=128),  # 1 MiB pages
    "small": dict(page_size=16, num_layers=2, num_kv_heads=4, head_dim=64),           # 32 KiB pages
}
SIZES = (256, 4096)
SUSTAINED = (("llama-3.2-1b", 256), ("small", 256), ("small", 4096))  # llama at 4096: 16 GiB a direction
SUSTAINED_BYTES = 64 << 20   # back-to-back calls move at least this much, in at least 4 calls
_D2H, _H2D = 2, 1

pytestmark = requires_cuda


class SwapCase:
    """``n`` scattered resident pages in a pool of ``pool_factor * n`` usable pages, a HostSwap of
    ``host_factor * n`` host pages and a non-blocking compute stream. Page contents are a pattern
    of each page's original id, so any round trip is checked bit for bit."""

    def __init__(self, shape: str, n: int, pool_factor: int = 2, host_factor: int = 1, seed: int = 0):
        import cupy as cp
        cfg = PoolConfig(pool_factor * n + 1, **SHAPES[shape], dtype="float16", device="cuda")
        self.shape, self.n, self.nbytes = shape, n, n * cfg.page_bytes
        self.pool = PagePool(cfg)
        self.swap = HostSwap(self.pool, host_factor * n)
        self.stream = cp.cuda.Stream(non_blocking=True)
        perm = np.random.default_rng(seed).permutation(self.pool.allocate(cfg.num_pages - 1)).tolist()
        self.pages, self.origin = perm[:n], perm[:n]
        self.pool.free(perm[n:])   # random free order: swap-in lands on scattered pages too
        self.words = self.pool.kv.reshape(cfg.num_pages, -1).view(cp.uint16)  # [num_pages, page_elems]
        cp.cuda.Stream.null.synchronize()  # the pool's zero fill ran on the legacy stream
        with self.stream:
            for i in range(0, n, 128):
                self.words[cp.asarray(self.pages[i:i + 128])] = self._pattern(self.origin[i:i + 128])
        self.stream.synchronize()
        self.ticket = None

    def _pattern(self, origin):
        import cupy as cp
        o = cp.asarray(origin, dtype=cp.int64)[:, None]
        return ((o * 7919 + cp.arange(self.words.shape[1])[None, :]) % 65521).astype(cp.uint16)

    def check(self) -> None:
        """Every resident page holds its original page's pattern, bit for bit."""
        import cupy as cp
        for i in range(0, self.n, 128):
            with self.stream:
                got = self.words[cp.asarray(self.pages[i:i + 128])]
                same = bool((got == self._pattern(self.origin[i:i + 128])).all())
            if not same:
                raise AssertionError(f"{self.shape} n={self.n}: pages {i}..{i + 128} changed in a round trip")

    def swap_out(self) -> None:
        self.ticket = self.swap.swap_out(self.pages, self.stream)
        self.ticket.event.synchronize()

    def swap_in(self) -> None:
        self.pages, self.ticket = self.swap.swap_in(self.ticket, self.stream), None
        self.stream.synchronize()

    def resident(self) -> None:
        """Setup between timed calls: pages back on the device, everything released."""
        if self.ticket is not None:
            self.swap_in()
        self.swap.reclaim(wait=True)

    def swapped_out(self) -> None:
        if self.ticket is None:
            self.swap_out()
        self.swap.reclaim(wait=True)

    def v0_copy(self, kind: int) -> None:
        """vLLM v0's swap: one cudaMemcpyAsync per page per layer for K and V (host slots 0..n-1;
        call only while no ticket holds host pages)."""
        import cupy as cp
        cfg = self.pool.config
        pb, chunk = cfg.page_bytes, cfg.page_bytes // (2 * cfg.num_layers)
        dptr, hptr, s = self.pool.kv.data.ptr, self.swap.host.ctypes.data, self.stream.ptr
        memcpy = cp.cuda.runtime.memcpyAsync
        for h, p in enumerate(self.pages):
            for j in range(2 * cfg.num_layers):
                d, hh = dptr + p * pb + j * chunk, hptr + h * pb + j * chunk
                memcpy(hh, d, chunk, _D2H, s) if kind == _D2H else memcpy(d, hh, chunk, _H2D, s)
        self.stream.synchronize()


def wall_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_trip_gbps(case: SwapCase, path: str, reps: int) -> tuple[float, float, float, float]:
    """Median GB/s over ``reps`` round trips (one warm-up), data checked: (out, in) end to end
    (host clock around the call and its completion), then (out, in) on the device (copy-stream
    events around the copies, as HostSwap.last_copy_s records them)."""
    case.swap.path = path
    times: list[tuple[float, ...]] = []
    for _ in range(reps + 1):
        t_out = wall_s(case.swap_out)
        case.swap.reclaim(wait=True)
        dev_out = case.swap.last_copy_s["out"]
        t_in = wall_s(case.swap_in)
        case.swap.reclaim(wait=True)
        times.append((t_out, t_in, dev_out, case.swap.last_copy_s["in"]))
    case.check()
    case.swap.path = "auto"
    return tuple(case.nbytes / statistics.median(col) / 1e9 for col in zip(*times[1:]))


def v0_gbps(case: SwapCase, reps: int) -> tuple[float, float]:
    case.resident()
    outs = [wall_s(lambda: case.v0_copy(_D2H)) for _ in range(reps)]
    ins = [wall_s(lambda: case.v0_copy(_H2D)) for _ in range(reps)]  # writes back the same bytes
    case.check()
    out, in_ = case.nbytes / min(outs) / 1e9, case.nbytes / min(ins) / 1e9
    return out, in_, out, in_   # host-timed; the stream is drained, so wall is device time too


def duplex_gbps(shape: str, n: int, reps: int, path: str = "auto") -> float:
    """Swap-out of one set and swap-in of another at the same time; GB/s of both together."""
    case = SwapCase(shape, n, pool_factor=3, host_factor=2)
    case.swap.path = path
    other = case.swap.swap_out(case.pool.allocate(n), case.stream)   # a second set already on host
    case.swap.reclaim(wait=True)
    times = []
    for r in range(reps + 1):
        def both():
            nonlocal other
            t = case.swap.swap_out(case.pages, case.stream)
            case.pages = case.swap.swap_in(other, case.stream)
            t.event.synchronize()
            case.stream.synchronize()
            other = t
        times.append(wall_s(both))
        case.swap.reclaim(wait=True)
    return 2 * case.nbytes / statistics.median(times[1:]) / 1e9


def duplex_alternating_gbps(shape: str, n: int, reps: int, calls: int = 8) -> float:
    """duplex_gbps with each side split into ``calls`` calls of n / calls pages, issued alternately
    (out, in, out, in, ...); host clock until the last out event and the compute stream completed."""
    case = SwapCase(shape, n, pool_factor=3, host_factor=2)
    k = n // calls
    others = [case.swap.swap_out(case.pool.allocate(k), case.stream) for _ in range(calls)]  # on host
    case.swap.reclaim(wait=True)
    times = []
    for _ in range(reps + 1):
        def alternate():
            nonlocal others
            outs, pages = [], []
            for i in range(calls):
                outs.append(case.swap.swap_out(case.pages[i * k:(i + 1) * k], case.stream))
                pages += case.swap.swap_in(others[i], case.stream)
            outs[-1].event.synchronize()
            case.stream.synchronize()
            others, case.pages = outs, pages
        times.append(wall_s(alternate))
        case.swap.reclaim(wait=True)
    return 2 * k * calls * case.pool.config.page_bytes / statistics.median(times[1:]) / 1e9


def num_sustained_calls(shape: str, n: int) -> int:
    page_bytes = PoolConfig(2, **SHAPES[shape], dtype="float16", device="cpu").page_bytes
    return max(4, -(-SUSTAINED_BYTES // (n * page_bytes)))


def sustained_gbps(shape: str, n: int, reps: int = 3) -> tuple[int, float, float]:
    """(K, out GB/s, in GB/s) of K back-to-back calls of n scattered pages each (different pages;
    K from num_sustained_calls). Out: host clock from before the first swap_out until the last
    ticket's event completed (the out stream runs the calls in order). In: K back-to-back swap_in
    of those tickets, until the compute stream, which waits on every in copy, completed. Median of
    ``reps`` after one warm-up; every page checked bit for bit."""
    calls = num_sustained_calls(shape, n)
    case = SwapCase(shape, calls * n)
    sets = [case.pages[i * n:(i + 1) * n] for i in range(calls)]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        tickets = [case.swap.swap_out(pages, case.stream) for pages in sets]
        tickets[-1].event.synchronize()
        t_out = time.perf_counter() - t0
        case.swap.reclaim(wait=True)
        t0 = time.perf_counter()
        sets = [case.swap.swap_in(t, case.stream) for t in tickets]
        case.stream.synchronize()
        times.append((t_out, time.perf_counter() - t0))
        case.swap.reclaim(wait=True)
    case.pages = [p for pages in sets for p in pages]
    case.check()
    return calls, *(case.nbytes / statistics.median(col) / 1e9 for col in zip(*times[1:]))


def kernel_slowdown(case: SwapCase, path: str, iters: int = 40) -> tuple[float, float, bool]:
    """(kernel ms alone, kernel ms beside a swap-out, whether the swap was still running at the end)
    for a bandwidth-bound add over 3 x 256 MiB on the compute stream."""
    import cupy as cp
    with case.stream:
        x, y = cp.ones(64 << 20, cp.float32), cp.ones(64 << 20, cp.float32)
        z = cp.empty_like(x)
        add = lambda: cp.add(x, y, out=z)  # noqa: E731
        alone = cuda_event_time_ms(add, iters=iters, stream=case.stream)
        case.resident()
        case.swap.path = path
        ticket = case.ticket = case.swap.swap_out(case.pages, case.stream)
        beside = cuda_event_time_ms(add, iters=iters, warmup=1, stream=case.stream)
        overlapped = not ticket.is_done()
    case.swap.wait(ticket)
    case.swap.path = "auto"
    case.resident()
    case.check()
    return alone, beside, overlapped


# ---- pytest-benchmark --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases():
    made: dict[tuple[str, int], SwapCase] = {}

    def get(shape: str, n: int) -> SwapCase:
        if (shape, n) not in made:
            made[(shape, n)] = SwapCase(shape, n)
        return made[(shape, n)]
    yield get
    made.clear()


def _report(benchmark, case: SwapCase) -> None:
    benchmark.extra_info.update(bytes=case.nbytes, page_bytes=case.pool.config.page_bytes)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = case.nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize("impl", ["hostswap", "v0-per-page-per-layer"])
def test_swap(benchmark, cases, shape, n, direction, impl):
    case = cases(shape, n)
    benchmark.group = f"swap-{direction} {shape} n={n}"
    if impl == "hostswap":
        run, setup = (case.swap_out, case.resident) if direction == "out" else (case.swap_in, case.swapped_out)
    else:
        setup, kind = case.resident, _D2H if direction == "out" else _H2D
        run = lambda: case.v0_copy(kind)  # noqa: E731
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    case.resident()
    case.check()
    _report(benchmark, case)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_pinned_ceiling(benchmark, direction):
    """One 1 GiB pinned copy: the PCIe ceiling every swap figure is compared against."""
    h2d, d2h = pinned_bandwidth()
    benchmark.group = "pinned ceiling"
    benchmark.extra_info["GBps"] = (h2d if direction == "h2d" else d2h) / 1e9
    benchmark.pedantic(lambda: None, rounds=1)


def test_duplex(benchmark):
    benchmark.extra_info["GBps"] = benchmark.pedantic(lambda: duplex_gbps("llama-3.2-1b", 2048, 3), rounds=1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_duplex_alternating(benchmark, shape):
    """duplex_gbps split into 8 + 8 calls issued alternately."""
    benchmark.extra_info["GBps"] = benchmark.pedantic(lambda: duplex_alternating_gbps(shape, 2048, 3), rounds=1)


@pytest.mark.parametrize("shape, n", SUSTAINED)
def test_sustained(benchmark, shape, n):
    """K back-to-back swap_out calls, then K back-to-back swap_in calls (sustained_gbps)."""
    calls, out, in_ = benchmark.pedantic(lambda: sustained_gbps(shape, n), rounds=1)
    benchmark.extra_info.update(calls=calls, out_GBps=out, in_GBps=in_)


def test_kernel_beside_swap_out(benchmark, cases):
    alone, beside, overlapped = benchmark.pedantic(
        lambda: kernel_slowdown(cases("llama-3.2-1b", 4096), "auto"), rounds=1)
    assert overlapped
    benchmark.extra_info.update(alone_ms=alone, beside_ms=beside, slowdown=beside / alone - 1)


# ---- one table of every figure -----------------------------------------------------------------
def main(path: str | None) -> None:
    if not has_cuda():
        print("bench_swap: no CUDA device, nothing to measure")
        return
    h2d, d2h = pinned_bandwidth()
    rows = [("pinned ceiling", "1 GiB", "-", d2h / 1e9, h2d / 1e9, d2h / 1e9, h2d / 1e9)]
    out: dict = {"device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "ceiling_GBps": {"d2h": d2h / 1e9, "h2d": h2d / 1e9}, "rows": [], "extra": {}}
    for shape in SHAPES:
        for n in SIZES:
            case = SwapCase(shape, n)
            reps = 5 if n <= 256 else 3
            for p in ("auto", "runs", "gather", "direct"):
                rows.append((shape, n, p, *round_trip_gbps(case, p, reps)))
            rows.append((shape, n, "v0 per page/layer", *v0_gbps(case, 1 if n > 256 else 3)))
            if n == 4096 and shape == "llama-3.2-1b":
                for p in ("auto", "gather", "direct"):
                    alone, beside, ov = kernel_slowdown(case, p)
                    out["extra"][f"kernel beside swap-out ({p})"] = dict(
                        alone_ms=alone, beside_ms=beside, slowdown=beside / alone - 1, overlapped=ov)
            del case
            if (shape, n) in SUSTAINED:
                calls, o, i = sustained_gbps(shape, n)
                rows.append((shape, n, f"auto x {calls} back-to-back", o, i, None, None))
    for shape in SHAPES:
        out["extra"][f"duplex {shape} n=2048"] = duplex_gbps(shape, 2048, 3)
        out["extra"][f"duplex {shape} n=2048 direct"] = duplex_gbps(shape, 2048, 3, "direct")
        out["extra"][f"duplex {shape} n=2048 as 8 + 8 alternating calls"] = duplex_alternating_gbps(shape, 2048, 3)
    out["rows"] = [dict(zip(("shape", "n", "path", "out_GBps", "in_GBps", "dev_out_GBps", "dev_in_GBps"), r))
                   for r in rows]
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n{out['device']}  {out['date']}")
    print("GB/s end to end (host clock) | on the device (copy-stream events); % of the pinned ceiling")
    print("(back-to-back rows: n pages per call, host clock over all calls; no device column)")
    print(f"{'shape':14} {'n':>5} {'path':24} {'out':>6} {'in':>6} {'out%':>5} {'in%':>5} |"
          f" {'dev out':>7} {'dev in':>6} {'out%':>5} {'in%':>5}")
    for s, n, p, o, i, do, di in rows:
        pct = [100 * x * 1e9 / c for x, c in ((o, d2h), (i, h2d))]
        dev = "" if do is None else (f" {do:7.1f} {di:6.1f} {100 * do * 1e9 / d2h:4.0f}%"
                                     f" {100 * di * 1e9 / h2d:4.0f}%")
        print(f"{s:14} {n!s:>5} {p:24} {o:6.1f} {i:6.1f} {pct[0]:4.0f}% {pct[1]:4.0f}% |{dev}")
    for k, v in out["extra"].items():
        print(f"{k}: {v if isinstance(v, dict) else f'{v:.1f} GB/s'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
