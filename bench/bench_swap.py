"""HostSwap GB/s against the PCIe ceiling and vLLM v0's per-page, per-layer copies (GPU only).

Shapes are named after real models; pages are scattered (a random permutation of the pool) so
neither side merges into long runs by luck. Every figure is end to end: Python bookkeeping and
enqueue included, host clock stopped after the copy's event (or the stream) completed.
"Back-to-back" rows issue K calls in a row, as a scheduler preempting several sequences does:
the host work of each call overlaps the copies of the calls before it.

"One call" rows (issue 17): one call of 256 scattered 32 KiB pages each way and both ways at
once, through the copy engines (staging gathered by CuPy's take, or by the copy kernel of
pagemem.kernels.swap_copy) and the direct kernel, against the pinned ceiling of the same run; and
a scheduler step of 8 requests x 32 pages, batched into one call against one call a request.

Run:  pytest bench/bench_swap.py --benchmark-group-by=group --no-cov   (pytest-benchmark tables)
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
from bench._harness import cuda_event_time_ms, device_name, gpu_timed, has_cuda, pinned_bandwidth, requires_cuda  # noqa: E402
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

    def __init__(self, shape: str, n: int, pool_factor: int = 2, host_factor: int = 1, seed: int = 0,
                 copy_kernel=None):
        import cupy as cp
        cfg = PoolConfig(pool_factor * n + 1, **SHAPES[shape], dtype="float16", device="cuda")
        self.shape, self.n, self.nbytes = shape, n, n * cfg.page_bytes
        self.pool = PagePool(cfg)
        self.swap = HostSwap(self.pool, host_factor * n, copy_kernel=copy_kernel)
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

    def write(self, pages, origin) -> None:
        """Fill ``pages`` with the patterns of ``origin`` (one original page id each)."""
        import cupy as cp
        with self.stream:
            for i in range(0, len(pages), 128):
                self.words[cp.asarray(pages[i:i + 128])] = self._pattern(origin[i:i + 128])
        self.stream.synchronize()

    def check(self, pages=None, origin=None) -> None:
        """Every page holds its original page's pattern, bit for bit (default: the resident set)."""
        import cupy as cp
        pages, origin = (self.pages, self.origin) if pages is None else (pages, origin)
        for i in range(0, len(pages), 128):
            with self.stream:
                got = self.words[cp.asarray(pages[i:i + 128])]
                same = bool((got == self._pattern(origin[i:i + 128])).all())
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


class Duplex:
    """Two sets of n patterned pages, one resident and one on the host as ``calls`` tickets.
    ``both()`` (the timed part: copies and their completion only) swaps the resident set out and
    the host set in, each side split into ``calls`` calls issued alternately (out, in, out, ...),
    then waits for the last out event and the compute stream; the sets trade places. ``between()``
    is the untimed set-up of the next round; ``verify()`` brings every page back and checks it."""

    def __init__(self, shape: str, n: int, calls: int = 1, path: str = "auto", copy_kernel=None):
        self.case = case = SwapCase(shape, n, pool_factor=3, host_factor=2, copy_kernel=copy_kernel)
        case.swap.path = path
        self.k, self.calls, self.nbytes = n // calls, calls, 2 * (n // calls) * calls * case.pool.config.page_bytes
        second = case.pool.allocate(n)
        case.write(second, second)                               # the second set: its own ids' patterns
        self.away = [(case.swap.swap_out(second[i * self.k:(i + 1) * self.k], case.stream),
                      second[i * self.k:(i + 1) * self.k]) for i in range(calls)]    # (ticket, origin)
        self.home = case.pages[:self.k * calls], case.origin[:self.k * calls]        # (pages, origin)
        case.swap.reclaim(wait=True)

    def both(self) -> None:
        swap, stream, k = self.case.swap, self.case.stream, self.k
        pages, origin = self.home
        outs, back = [], []
        for i, (ticket, _) in enumerate(self.away):
            outs.append((swap.swap_out(pages[i * k:(i + 1) * k], stream), origin[i * k:(i + 1) * k]))
            back += swap.swap_in(ticket, stream)
        outs[-1][0].event.synchronize()
        stream.synchronize()
        self.home = back, [o for _, org in self.away for o in org]
        self.away = outs

    def between(self) -> None:
        self.case.swap.reclaim(wait=True)

    def verify(self) -> None:
        self.between()
        self.case.check(*self.home)
        for ticket, origin in self.away:
            self.case.check(self.case.swap.swap_in(ticket, self.case.stream), origin)
        self.away = []


def duplex_gbps(shape: str, n: int, reps: int, path: str = "auto", calls: int = 1, copy_kernel=None) -> float:
    """Swap-out of one set and swap-in of another at the same time; GB/s of both together, median
    of ``reps`` rounds after one warm-up, host clock around the copies only; every page checked."""
    duplex = Duplex(shape, n, calls, path, copy_kernel)
    times = []
    for _ in range(reps + 1):
        times.append(wall_s(duplex.both))
        duplex.between()
    duplex.verify()
    return duplex.nbytes / statistics.median(times[1:]) / 1e9


def duplex_alternating_gbps(shape: str, n: int, reps: int, calls: int = 8) -> float:
    """duplex_gbps with each side split into ``calls`` calls of n / calls pages, issued alternately."""
    return duplex_gbps(shape, n, reps, calls=calls)


def num_sustained_calls(shape: str, n: int) -> int:
    page_bytes = PoolConfig(2, **SHAPES[shape], dtype="float16", device="cpu").page_bytes
    return max(4, -(-SUSTAINED_BYTES // (n * page_bytes)))


class Sustained:
    """K back-to-back calls of n scattered pages each (K from num_sustained_calls), every page
    patterned. ``out_all()`` / ``in_all()`` are the timed parts (the calls and the completion of
    the last one); ``resident()`` / ``swapped()`` the untimed set-up; ``verify()`` checks every page."""

    def __init__(self, shape: str, n: int):
        self.calls = num_sustained_calls(shape, n)
        self.case = SwapCase(shape, self.calls * n)
        self.nbytes = self.case.nbytes
        self.sets = [(self.case.pages[i * n:(i + 1) * n], self.case.origin[i * n:(i + 1) * n])
                     for i in range(self.calls)]
        self.tickets: list = []

    def out_all(self) -> None:
        self.tickets = [(self.case.swap.swap_out(p, self.case.stream), o) for p, o in self.sets]
        self.tickets[-1][0].event.synchronize()   # the out stream runs the calls in order

    def in_all(self) -> None:
        self.sets = [(self.case.swap.swap_in(t, self.case.stream), o) for t, o in self.tickets]
        self.tickets = []
        self.case.stream.synchronize()            # the compute stream waits on every in copy

    def resident(self) -> None:
        if self.tickets:
            self.in_all()
        self.case.swap.reclaim(wait=True)

    def swapped(self) -> None:
        if not self.tickets:
            self.out_all()
        self.case.swap.reclaim(wait=True)

    def verify(self) -> None:
        self.resident()
        for pages, origin in self.sets:
            self.case.check(pages, origin)


def sustained_gbps(shape: str, n: int, reps: int = 3) -> tuple[int, float, float]:
    """(K, out GB/s, in GB/s) of K back-to-back calls of n scattered pages each (different pages;
    K from num_sustained_calls). Out: host clock from before the first swap_out until the last
    ticket's event completed (the out stream runs the calls in order). In: K back-to-back swap_in
    of those tickets, until the compute stream, which waits on every in copy, completed. Median of
    ``reps`` after one warm-up; every page checked bit for bit."""
    s = Sustained(shape, n)
    times = []
    for _ in range(reps + 1):
        t_out = wall_s(s.out_all)
        s.case.swap.reclaim(wait=True)
        times.append((t_out, wall_s(s.in_all)))
        s.case.swap.reclaim(wait=True)
    s.verify()
    return s.calls, *(s.nbytes / statistics.median(col) / 1e9 for col in zip(*times[1:]))


def kernel_slowdown(case: SwapCase, path: str, iters: int = 40) -> tuple[float, float, bool]:
    """(kernel ms alone, kernel ms beside a swap-out, whether the swap was still running at the end)
    for a bandwidth-bound add over 3 x 256 MiB on the compute stream. Whether they overlapped is
    reported, not asserted: a figure with overlapped=False measured the kernel alone twice."""
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

    def get(shape: str, n: int, kernel: bool = False) -> SwapCase:
        if (shape, n, kernel) not in made:
            made[(shape, n, kernel)] = SwapCase(shape, n, copy_kernel=_copy_kernel() if kernel else None)
        return made[(shape, n, kernel)]
    yield get
    made.clear()


def _report(benchmark, case: SwapCase) -> None:
    benchmark.extra_info.update(bytes=case.nbytes, page_bytes=case.pool.config.page_bytes)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = case.nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize("impl", ["hostswap", "hostswap-copy-kernel", "v0-per-page-per-layer"])
def test_swap(benchmark, cases, shape, n, direction, impl):
    case = cases(shape, n, impl == "hostswap-copy-kernel")
    benchmark.group = f"swap-{direction} {shape} n={n}"
    if impl.startswith("hostswap"):
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
    """One 1 GiB pinned copy, timed itself (stream synchronized in the timed call) and its bytes
    checked: the PCIe ceiling every swap figure is compared against."""
    import cupy as cp
    nbytes = 1 << 30
    mem = cp.cuda.alloc_pinned_memory(nbytes)
    host = np.frombuffer(mem, dtype=np.uint8, count=nbytes)
    pattern = np.arange(256, dtype=np.uint8)
    host.reshape(-1, 256)[:] = pattern                               # byte i holds i % 256
    dev = cp.empty(nbytes, dtype=cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    if direction == "d2h":
        dev.set(host, stream=stream)
        stream.synchronize()
        host[:] = 0
    copy = (lambda: dev.set(host, stream=stream)) if direction == "h2d" else (lambda: dev.get(stream=stream, out=host))
    benchmark.group = "pinned ceiling"
    benchmark.pedantic(gpu_timed(copy, stream), rounds=5, warmup_rounds=1)
    assert bool((dev.reshape(-1, 256) == cp.asarray(pattern)).all()), "the device copy differs"
    assert (host.reshape(-1, 256) == pattern).all(), "the host copy differs"
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GBps"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape, n, calls, kernel", [("llama-3.2-1b", 2048, 1, False), ("llama-3.2-1b", 2048, 8, False),
                                                     ("small", 2048, 8, False), ("small", 256, 1, False),
                                                     ("small", 256, 1, True)])
def test_duplex(benchmark, shape, n, calls, kernel):
    """A swap-out of n pages and a swap-in of n others at once (each side as ``calls`` calls
    issued alternately; optionally gathered by the copy kernel): only the copies are timed;
    every page is checked afterwards."""
    duplex = Duplex(shape, n, calls, copy_kernel=_copy_kernel() if kernel else None)
    benchmark.group = "duplex swap (out + in at once)"
    benchmark.pedantic(duplex.both, setup=duplex.between, rounds=3, warmup_rounds=1)
    duplex.verify()
    benchmark.extra_info.update(bytes=duplex.nbytes, calls=calls, n=n, copy_kernel=kernel)
    if benchmark.stats:
        benchmark.extra_info["GBps"] = duplex.nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize("shape, n", SUSTAINED)
def test_sustained(benchmark, shape, n, direction):
    """K back-to-back swap_out calls, or K back-to-back swap_in calls: only the calls and their
    completion are timed (set-up between rounds is not); every page is checked afterwards."""
    s = Sustained(shape, n)
    benchmark.group = f"sustained swap-{direction} {shape} n={n}"
    run, setup = (s.out_all, s.resident) if direction == "out" else (s.in_all, s.swapped)
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
    s.verify()
    benchmark.extra_info.update(calls=s.calls, bytes=s.nbytes)
    if benchmark.stats:
        benchmark.extra_info["GBps"] = s.nbytes / benchmark.stats.stats.median / 1e9


def test_kernel_beside_swap_out(benchmark, cases):
    """A bandwidth-bound kernel alone and beside a 4 GiB swap-out; whether they overlapped is
    reported in extra_info, not asserted (timing outcomes belong in the table, not in a test)."""
    alone, beside, overlapped = benchmark.pedantic(
        lambda: kernel_slowdown(cases("llama-3.2-1b", 4096), "auto"), rounds=1)
    benchmark.extra_info.update(alone_ms=alone, beside_ms=beside, slowdown=beside / alone - 1,
                                overlapped=overlapped)


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
    out["one_call"] = one_call_rows(d2h, h2d)
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
    print_one_call(out["one_call"])


# ---- one call of 256 scattered 32 KiB pages, and a scheduler step of 8 requests (issue 17) -------
TARGET_SHARE, TARGET_DUPLEX_GBPS = 0.85, 80.0


def _copy_kernel():
    from pagemem.kernels.swap_copy import copy_pages
    return copy_pages


def step_gbps(kernel, reps: int = 9) -> dict:
    """A step swapping 8 requests of 32 pages (256 small pages) out, then back in: batched (8
    deferred calls, one flush: one copy a direction) against one call a request (+ a wait on each
    copy, as the scheduler did). GB/s of the 8 MiB, host clock until the copies completed; every
    page checked against its request's pattern at the end."""
    import cupy as cp
    from bench.bench_swap_host import StepCase
    case = StepCase("cuda", copy_kernel=kernel)
    words = case.pool.kv.reshape(case.pool.num_pages, -1).view(cp.uint16)          # [num_pages, page words]
    origin = [list(g) for g in case.groups]                  # each page's first id: its pattern, for good
    pattern = lambda ids: (cp.asarray(ids, dtype=cp.int64)[:, None] * 7919 + cp.arange(words.shape[1])) % 65521  # noqa: E731
    words[cp.asarray(sum(origin, []))] = pattern(sum(origin, [])).astype(cp.uint16)
    cp.cuda.Stream.null.synchronize()
    nbytes, res = 256 * case.pool.config.page_bytes, {}
    for impl, out_fn, in_fn in (("batched", case.out_batched, case.in_batched),
                                ("one call a request", case.out_per_request, case.in_per_request)):
        outs, ins = [], []
        for _ in range(reps + 1):
            case.resident()
            outs.append(wall_s(lambda: (out_fn(), case.swap.reclaim(wait=True))))
            ins.append(wall_s(lambda: (in_fn(), case.stream.synchronize())))   # the compute stream waits on the in copy
        res[impl] = {"out": nbytes / statistics.median(outs[1:]) / 1e9, "in": nbytes / statistics.median(ins[1:]) / 1e9}
    case.resident()
    got = words[cp.asarray(sum(case.groups, []))]
    if not bool((got == pattern(sum(origin, [])).astype(cp.uint16)).all()):
        raise AssertionError("a step's swaps changed page contents")
    case.close()
    return res


def one_call_rows(d2h: float, h2d: float) -> dict:
    """One call of 256 scattered 32 KiB pages each way (end to end and on the device) and both at
    once (duplex), through the copy engines with CuPy's gather and with the copy kernel, and the
    direct kernel; GB/s against the pinned ceiling of this run; then the step rows."""
    rows = {}
    for name, kernel, path in (("gather (cupy take)", None, "gather"), ("gather (copy kernel)", _copy_kernel(), "gather"),
                               ("direct", None, "direct")):
        o, i, do, di = round_trip_gbps(SwapCase("small", 256, copy_kernel=kernel), path, 9)
        dup = duplex_gbps("small", 256, 9, path, copy_kernel=kernel)
        rows[name] = dict(out=o, in_=i, dev_out=do, dev_in=di, duplex=dup, out_share=o * 1e9 / d2h,
                          in_share=i * 1e9 / h2d, dev_out_share=do * 1e9 / d2h, dev_in_share=di * 1e9 / h2d)
    for name, kernel in (("step, cupy take", None), ("step, copy kernel", _copy_kernel())):
        rows[name] = step_gbps(kernel)
    return rows


def print_one_call(rows: dict) -> None:
    print(f"\none call of 256 scattered 32 KiB pages (8 MiB); targets: {TARGET_SHARE:.0%} of the pinned ceiling "
          f"each way, duplex >= {TARGET_DUPLEX_GBPS:.0f} GB/s")
    print(f"{'path':22} {'out':>6} {'in':>6} {'out%':>5} {'in%':>5} | {'dev out':>7} {'dev in':>6} {'out%':>5} "
          f"{'in%':>5} | {'duplex':>6}  met (e2e each way, duplex)")
    for name, r in rows.items():
        if "duplex" not in r:
            continue
        met = (r["out_share"] >= TARGET_SHARE and r["in_share"] >= TARGET_SHARE, r["duplex"] >= TARGET_DUPLEX_GBPS)
        print(f"{name:22} {r['out']:6.1f} {r['in_']:6.1f} {100 * r['out_share']:4.0f}% {100 * r['in_share']:4.0f}% | "
              f"{r['dev_out']:7.1f} {r['dev_in']:6.1f} {100 * r['dev_out_share']:4.0f}% {100 * r['dev_in_share']:4.0f}% | "
              f"{r['duplex']:6.1f}  {met}")
    for name, r in rows.items():
        if "duplex" not in r:
            print(f"{name}: " + "; ".join(f"{impl} out {v['out']:.1f} / in {v['in']:.1f} GB/s" for impl, v in r.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
