"""Simulator speed: 100,000 requests through the real Scheduler, PagePool and HostSwap on one CPU core.

Workloads: ShareGPT- and Alpaca-like traces (``pagemem.traces``) with Poisson arrivals near the
modelled capacity, on the estimated step model of Llama-3.2-1B on an H200 (``pagemem simulate``'s
default), a pool of 8,192 pages of 16 tokens, 256 sequences, a 2,048-token budget, swap
preemption. Reported: CPU seconds (``time.process_time``, so other processes on a shared machine
do not count), steps, row-steps (one request in one step), microseconds a row-step; beside them,
measured in the same run, the Python floor of this machine: a loop doing one attribute increment
per row-step, the least any per-row scheduler written in Python could cost.

Run:  pytest bench/bench_simulator.py --benchmark-only -s
"""
from __future__ import annotations

import time

import pytest

from pagemem.models.sim_cli import estimated_step_model
from pagemem.simulator import SimConfig, Simulator
from pagemem.traces import synthetic_trace

NUM_REQUESTS = 100_000
RATES = {"sharegpt": 250.0, "alpaca": 2_000.0}    # requests/s, about what the modelled GPU serves
CONFIG = SimConfig(num_pages=8193, page_size=16, max_num_seqs=256, max_num_batched_tokens=2048,
                   preemption="swap", swap_space=4.0)
ROW_STEPS: dict[str, int] = {}


@pytest.mark.benchmark(group="simulator")
@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_simulate_100k_requests(benchmark, dataset):
    trace = synthetic_trace(NUM_REQUESTS, dataset, rate=RATES[dataset], seed=0)
    model = estimated_step_model()
    out = {}

    def run():
        sim = Simulator(trace, model, CONFIG)
        t0 = time.process_time()
        out["result"] = sim.run()
        out["cpu_s"] = time.process_time() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    res, cpu = out["result"], out["cpu_s"]
    assert len(res.outputs) == NUM_REQUESTS                      # every request served
    assert sum(o.num_output_tokens for o in res.outputs) == sum(r.output_len for r in trace)
    rows = sum(s.num_seqs for s in res.steps)
    ROW_STEPS[dataset] = rows
    info = dict(requests=NUM_REQUESTS, cpu_s=cpu, steps=len(res.steps), row_steps=rows,
                us_per_row_step=1e6 * cpu / rows, us_per_step=1e6 * cpu / len(res.steps),
                simulated_s=res.elapsed_s, preemptions=dict(res.scheduler.num_preemptions))
    benchmark.extra_info.update(info)
    print(f"\n{dataset}: {NUM_REQUESTS} requests in {cpu:.1f} CPU s; {len(res.steps)} steps, {rows} row-steps, "
          f"{info['us_per_row_step']:.2f} us a row-step; {res.elapsed_s:.0f} simulated s; {info['preemptions']}")


class _Row:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


@pytest.mark.benchmark(group="simulator")
def test_python_floor_one_increment_per_row_step(benchmark):
    """The same number of row-steps as the ShareGPT run (or 30 million), one attribute increment each."""
    rows = ROW_STEPS.get("sharegpt", 30_000_000)
    batch = [_Row() for _ in range(256)]
    out = {}

    def run():
        t0 = time.process_time()
        for _ in range(rows // 256):
            for r in batch:
                r.n += 1
        out["cpu_s"] = time.process_time() - t0

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(row_steps=rows, cpu_s=out["cpu_s"], us_per_row_step=1e6 * out["cpu_s"] / rows)
    print(f"\nPython floor: {rows} increments in {out['cpu_s']:.1f} CPU s, {1e6 * out['cpu_s'] / rows:.3f} us each")
