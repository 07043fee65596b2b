"""Host cost of swapping: HostSwap and PagePool bookkeeping per call, on the CPU, each beside a
baseline measured in the same run and pytest-benchmark group.

On a GPU a small page (32 KiB) crosses PCIe in ~0.6 µs, so Python spent per page before or
while the copies are enqueued caps small-page swap speed. Here pages hold 1 token of 1 layer,
1 KV head and head_dim 1 (4 bytes), so the NumPy copies are negligible and what is timed is
the bookkeeping: checks, page and host-slot accounting, queues. Pages are scattered (the pool's
free queue starts as a random permutation), as in a pool that has been running a while.
Baselines: the same cycle on plain Python lists (a free stack of pages, one of host slots, the
same NumPy copies, no checks, tickets or plans); allocate+free on a list and on vLLM's doubly
linked free list (bench/_harness.py); the copy plan's host runs found by a Python loop.

Per call and per step (256 scattered pages): one swap_out / swap_in call, and a step that
preempts (or resumes) 8 requests of 32 pages each, batched (8 deferred calls and one flush, as the
scheduler does now) against one call a request followed by a wait on its copy (the scheduler
before: the host blocked until each victim's pages were free). Backends: "cpu" (the NumPy
HostSwap), "cuda-branch" (HostSwap's CUDA branch over a CuPy stand-in whose CUDA calls do
nothing, bench/_harness.py NullCupy: pagemem's own host work of a CUDA call without the
driver's; with and without a copy kernel), and "cuda" on a GPU (real copies: the host's time until
the step could launch, copies waited on only where the path waits).

Run: pytest bench/bench_swap_host.py --benchmark-only --benchmark-group-by=group --no-cov
     PYTHONPATH=. python bench/bench_swap_host.py    (the per-call and per-step table only)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script or under pytest
from bench._harness import BASELINE_POOLS, DevArray, ListPool, NullCupy, has_cuda, null_copy_kernel  # noqa: E402
from pagemem import HostSwap, PagePool, PoolConfig  # noqa: E402
from pagemem._swap_copy import plan_copies  # noqa: E402

SIZES = (256, 2048)


def make_swap(n: int, seed: int = 0) -> tuple[PagePool, HostSwap]:
    """A pool of 2n usable 4-byte pages, free queue in random order, and n host pages."""
    pool = PagePool(PoolConfig(2 * n + 1, 1, 1, 1, 1, "float16", "cpu"))
    pool.free(np.random.default_rng(seed).permutation(pool.allocate(2 * n)).tolist())
    return pool, HostSwap(pool, n)


class ListSwap:
    """The baseline cycle: a ListPool of 2n pages (scattered free order), a list of n free host
    slots, and the copies HostSwap makes on the CPU, as fancy-indexed NumPy assignments."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.pool = ListPool(2 * n + 1)
        self.pool.free(np.random.default_rng(seed).permutation(self.pool.allocate(2 * n)).tolist())
        self.kv = np.zeros((2 * n + 1, 1, 2, 1, 1, 1), np.float16)
        self.host = np.zeros((n, 1, 2, 1, 1, 1), np.float16)
        self.host_free = list(range(n - 1, -1, -1))

    def swap_out(self, pages: list[int]) -> list[int]:
        slots = self.host_free[-len(pages):][::-1]
        del self.host_free[-len(pages):]
        self.host[slots] = self.kv[pages]
        self.pool.free(pages[::-1])
        return slots

    def swap_in(self, slots: list[int]) -> list[int]:
        pages = self.pool.allocate(len(slots))
        self.kv[pages] = self.host[slots]
        self.host_free.extend(reversed(slots))
        return pages


@pytest.mark.parametrize("impl", ["hostswap", "python-lists"])
@pytest.mark.parametrize("n", SIZES)
def test_swap_cycle(benchmark, n, impl):
    """One cycle: swap_out of n pages, reclaim, swap_in, reclaim, free the pages in reverse and
    allocate n again (the life of a preempted sequence). extra_info has µs per page."""
    benchmark.group = f"swap host cost, {n} pages a call"
    if impl == "hostswap":
        pool, swap = make_swap(n)
        pages = pool.allocate(n)

        def cycle():
            nonlocal pages
            ticket = swap.swap_out(pages)
            swap.reclaim()
            back = swap.swap_in(ticket)
            swap.reclaim()
            pool.free(back[::-1])
            pages = pool.allocate(n)
    else:
        base = ListSwap(n)
        pages = base.pool.allocate(n)

        def cycle():
            nonlocal pages
            back = base.swap_in(base.swap_out(pages))
            base.pool.free(back[::-1])
            pages = base.pool.allocate(n)

    benchmark.pedantic(cycle, rounds=200 if n > 256 else 1000, iterations=1, warmup_rounds=20)
    if impl == "hostswap":
        pool.check_integrity()
        swap.check_integrity()
        assert swap.num_free_host_pages == n and pool.num_free_pages == n
    else:
        assert len(base.host_free) == n and len(base.pool.free_pages) == n
    benchmark.extra_info.update(pages_per_call=n, impl=impl)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["us_per_page"] = benchmark.stats.stats.median * 1e6 / n


@pytest.mark.parametrize("impl", ["pagemem", *BASELINE_POOLS])
@pytest.mark.parametrize("n", SIZES)
def test_allocate_free_many(benchmark, n, impl):
    """free(allocate(n)) on a pool of 2n pages whose free queue is scattered."""
    benchmark.group = f"allocate+free many, {n} pages a call"
    if impl == "pagemem":
        pool, _ = make_swap(n)
    else:
        pool = BASELINE_POOLS[impl](2 * n + 1)
        pool.free(np.random.default_rng(0).permutation(pool.allocate(2 * n)).tolist())
    benchmark.pedantic(lambda: pool.free(pool.allocate(n)), rounds=200 if n > 256 else 1000,
                       iterations=1, warmup_rounds=20)
    assert sorted(pool.allocate(2 * n)) == list(range(1, 2 * n + 1))   # nothing lost or doubled
    benchmark.extra_info.update(pages_per_call=n, impl=impl)


def loop_host_runs(slots: list[int], staging_pages: int) -> list[tuple[int, int, int]]:
    """The baseline plan: (position, host slot, length) runs of a gathered copy by a Python loop."""
    runs: list[list[int]] = []
    for i, h in enumerate(slots):
        if runs and i % staging_pages and h == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([i, h, 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("impl", ["plan_copies", "python-loop"])
@pytest.mark.parametrize("n", SIZES)
def test_copy_plan(benchmark, n, impl):
    """What a CUDA swap_out of n scattered 32 KiB pages computes before its first CUDA call:
    plan_copies (path choice and host runs; here "gather", one chunk) from the checked id list."""
    benchmark.group = f"swap plan (CUDA path, host side), {n} pages"
    ids = np.random.default_rng(0).permutation(np.arange(1, 2 * n + 1))[:n].tolist()
    slots = np.arange(n)                     # swap_out takes the lowest free host slots
    if impl == "plan_copies":
        plan = benchmark(plan_copies, ids, slots, "auto", 32 << 10, 8 << 20, 8192)
        assert plan.path == "gather" and plan.runs == [(0, 0, n)]
    else:
        assert benchmark(loop_host_runs, slots.tolist(), 8192) == [(0, 0, n)]


# ---- per call and per step: 256 scattered pages, batched against one call a request --------------
STEP_PAGES, STEP_REQUESTS = 256, 8
BACKENDS = ["cpu", "cuda-branch", "cuda-branch+kernel"] + (["cuda"] if has_cuda() else [])


class StepCase:
    """A HostSwap over 2n usable scattered pages and n host pages; a step's ``requests`` groups of
    n / requests pages. On "cuda-branch" the pool's NumPy pages pose as device memory and ``cupy``
    resolves to NullCupy while the case runs (``close()`` restores it); pages are 4 bytes (min_run_bytes
    scaled as for 32 KiB pages, so "auto" decides as it would there). On "cuda", 32 KiB pages."""

    def __init__(self, backend: str, n: int = STEP_PAGES, requests: int = STEP_REQUESTS, seed: int = 0,
                 copy_kernel=None) -> None:
        self.saved = sys.modules.get("cupy")
        kernel = copy_kernel
        if backend.startswith("cuda-branch"):
            sys.modules["cupy"] = NullCupy()
            kernel = null_copy_kernel if backend.endswith("kernel") else None
        if backend == "cuda":
            import cupy as cp
            cfg = PoolConfig(2 * n + 1, 16, 2, 4, 64, "float16", "cuda")      # 32 KiB pages
            self.stream, min_run = cp.cuda.Stream(non_blocking=True), 8 << 20
        else:
            cfg, self.stream, min_run = PoolConfig(2 * n + 1, 1, 1, 1, 1, "float16", "cpu"), None, (8 << 20) * 4 // (32 << 10)
        self.pool = PagePool(cfg)
        if backend.startswith("cuda-branch"):
            self.pool.kv, self.pool.device = self.pool.kv.view(DevArray), "cuda"
        self.pool.free(np.random.default_rng(seed).permutation(self.pool.allocate(2 * n)).tolist())
        self.swap = HostSwap(self.pool, n, min_run_bytes=min_run, copy_kernel=kernel)
        pages = self.pool.allocate(n)
        k = n // requests
        self.groups, self.tickets = [pages[i * k:(i + 1) * k] for i in range(requests)], []

    def close(self) -> None:
        self.resident()
        self.pool.check_integrity()
        self.swap.check_integrity()
        if self.saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = self.saved

    def out_batched(self) -> None:
        self.tickets = [self.swap.swap_out(g, self.stream, defer=True) for g in self.groups]
        self.swap.flush(self.stream)

    def out_per_request(self) -> None:
        self.tickets = [self.swap.swap_out(g, self.stream) for g in self.groups]
        for t in self.tickets:
            self.swap.wait(t)

    def in_batched(self) -> None:
        self.groups = [self.swap.swap_in(t, self.stream, defer=True) for t in self.tickets]
        self.swap.flush(self.stream)
        self.tickets = []

    def in_per_request(self) -> None:
        self.groups, self.tickets = [self.swap.swap_in(t, self.stream) for t in self.tickets], []

    def resident(self) -> None:
        """Untimed set-up: every group on the device, every copy completed and reclaimed."""
        if self.tickets:
            self.in_batched()
        self.swap.reclaim(wait=True)
        if self.stream is not None:
            self.stream.synchronize()

    def swapped(self) -> None:
        if not self.tickets:
            self.out_batched()
        self.swap.reclaim(wait=True)


STEP_RUNS = {("out", "batched"): ("out_batched", "resident"), ("out", "one call a request"): ("out_per_request", "resident"),
             ("in", "batched"): ("in_batched", "swapped"), ("in", "one call a request"): ("in_per_request", "swapped")}


@pytest.mark.parametrize("impl", ["batched", "one call a request"])
@pytest.mark.parametrize("requests", [1, STEP_REQUESTS], ids=["per-call", "per-step"])
@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_step_host_cost(benchmark, backend, direction, requests, impl):
    """Host time of one call of 256 scattered pages (per-call) or of a step swapping 8 requests of
    32 pages (per-step), deferred + one flush against one call a request (+ its wait)."""
    if requests == 1 and impl != "batched":
        pytest.skip("one request: one call either way")
    case = StepCase(backend, requests=requests)
    run, setup = (getattr(case, name) for name in STEP_RUNS[(direction, impl)])
    benchmark.group = f"swap-{direction} host cost, {STEP_PAGES} pages as {requests} request(s), {backend}"
    try:
        benchmark.pedantic(run, setup=setup, rounds=300 if backend != "cuda" else 50, warmup_rounds=10)
        calls = case.swap.num_calls[direction]
    finally:
        case.close()
    benchmark.extra_info.update(pages=STEP_PAGES, requests=requests, backend=backend, impl=impl, calls=calls)


def step_table(rounds: int = 300) -> list[tuple]:
    """(backend, direction, requests, impl, median µs) of every per-call and per-step case."""
    import statistics
    import time
    rows = []
    for backend in BACKENDS:
        for direction in ("out", "in"):
            for requests, impl in ((1, "batched"), (STEP_REQUESTS, "batched"), (STEP_REQUESTS, "one call a request")):
                case = StepCase(backend, requests=requests)
                run, setup = (getattr(case, name) for name in STEP_RUNS[(direction, impl)])
                times = []
                for _ in range(rounds + 10):
                    setup()
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                case.close()
                rows.append((backend, direction, requests, impl, statistics.median(times[10:]) * 1e6))
    return rows


if __name__ == "__main__":
    print(f"host µs, {STEP_PAGES} scattered pages: one call, or a step of {STEP_REQUESTS} requests")
    print(f"{'backend':20} {'dir':4} {'requests':>8} {'impl':20} {'median µs':>10}")
    for b, d, r, i, us in step_table():
        print(f"{b:20} {d:4} {r:8} {i:20} {us:10.1f}")
