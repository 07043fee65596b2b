"""Simulator: the step model's arithmetic, timelines computed by hand, swap time and bookkeeping
through the real HostSwap, and seeded workloads that must drain with every page back.

(That the simulator decides each step as the engine does is tested against the engine itself,
in tests/models/test_sim_cli.py.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pagemem.simulator import SimConfig, Simulator, StepModel
from pagemem.traces import TraceRequest


def constant_model(decode_s: float = 1.0, prefill_per_s: float = 1.0, overhead_s: float = 0.0,
                   gb_per_s: float = 1.0, kv_bytes_per_token: int = 1000) -> StepModel:
    return StepModel((1,), (1,), ((decode_s,),), prefill_per_s, overhead_s, gb_per_s, gb_per_s, kv_bytes_per_token)


def run(trace, model=None, **config):
    config.setdefault("num_pages", 64)
    config.setdefault("page_size", 4)
    sim = Simulator(trace, model or constant_model(), SimConfig(**config), vocab_size=97, record_decisions=True)
    return sim, sim.run()


# ---- the step model -----------------------------------------------------------------------------
def grid_model() -> StepModel:
    # decode_s [batch][mean context]: batch 1 -> 1 s at 10 tokens, 3 s at 30; batch 3 -> 5 s, 7 s
    return StepModel((1, 3), (10, 30), ((1.0, 3.0), (5.0, 7.0)), 5.0, 0.5, 2.0, 4.0, 250_000_000)


def test_decode_time_is_bilinear_inside_the_grid_and_linear_outside():
    m = grid_model()
    assert m.decode_seconds(1, 10) == pytest.approx(1.0)
    assert m.decode_seconds(2, 2 * 20) == pytest.approx(4.0)      # middle of the cell: (2 + 6) / 2
    assert m.decode_seconds(3, 3 * 25) == pytest.approx(6.5)
    assert m.decode_seconds(5, 5 * 10) == pytest.approx(9.0)      # batch 5: 1 + 2 * (5 - 1)
    assert m.decode_seconds(1, 50) == pytest.approx(5.0)          # context 50: 1 + 2 * (3 - 1)
    assert m.decode_seconds(1, 1) == pytest.approx(0.1)           # context 1: 1 - 2 * 9 / 20
    steep = StepModel((1, 2), (10, 20), ((1.0, 3.0), (1.0, 3.0)), 1.0, 0.0, 1.0, 1.0, 1)
    assert steep.decode_seconds(1, 1) == 0.0                      # 1 - 2 * 9 / 10 < 0: clamped


def test_step_and_swap_seconds_add_up():
    m = grid_model()
    assert m.step_seconds(2, 40, 10) == pytest.approx(4.0 + 0.5 + 10 / 5.0)
    assert m.step_seconds(0, 0, 10) == pytest.approx(0.5 + 2.0)
    assert m.step_seconds(2, 40, 0) == pytest.approx(4.0)
    # pages of 4 tokens x 250 MB = 1 GB: two out at 2 GB/s, one in at 4 GB/s
    assert m.swap_seconds(2, 1, 4) == pytest.approx(1.0 + 0.25)


def test_a_one_point_grid_is_flat():
    m = constant_model(0.25)
    assert m.decode_seconds(1, 1) == m.decode_seconds(500, 10**6) == 0.25


def test_step_model_json_round_trip_and_errors_named(tmp_path):
    m = grid_model()
    path = tmp_path / "m.json"
    m.save(path)
    assert StepModel.load(path) == m
    d = json.loads(path.read_text())
    for change, message in [({"decode_batch": [3, 1]}, "decode_batch must be increasing"),
                            ({"decode_s": [[1.0, 3.0]]}, r"decode_s must be \[2\]\[2\]"),
                            ({"prefill_tokens_per_s": 0}, "prefill_tokens_per_s must be finite and > 0"),
                            ({"decode_s": [[1.0, -3.0], [5.0, 7.0]]}, "decode_s must be finite and > 0"),
                            ({"kv_bytes_per_token": 1.5}, "kv_bytes_per_token must be an int"),
                            ({"colour": 1}, r"unknown keys \['colour'\]")]:
        path.write_text(json.dumps({**d, **change}))
        with pytest.raises(ValueError, match=message):
            StepModel.load(path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "pcie_in_gb_per_s"}))
    with pytest.raises(ValueError, match=r"missing keys \['pcie_in_gb_per_s'\]"):
        StepModel.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        StepModel.load(path)


# ---- timelines by hand ----------------------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_request_timeline(async_scheduling):
    """Prompt 3, output 3; decode 1 s a step, prefill 1 token/s: prefill ends at 3 s (first token),
    decodes at 4 s and 5 s. Async scheduling takes the ids in a step late, and retires the request
    in a fourth call that schedules nothing: the times are the same."""
    sim, res = run([TraceRequest(0.0, 3, 3)], async_scheduling=async_scheduling)
    assert [s.t for s in res.steps] == [3.0, 4.0, 5.0]
    assert [s.num_prefill_tokens for s in res.steps] == [3, 0, 0]
    (out,) = res.outputs
    assert (out.ttft_s, out.tpot_s, out.num_output_tokens, res.elapsed_s) == (3.0, 1.0, 3, 5.0)
    rows = [d.ran for d in res.decisions]
    finished = [d.finished for d in res.decisions]
    if async_scheduling:
        assert rows == [((0, 3),), ((0, 1),), ((0, 1),), ()] and finished == [(), (), (), (0,)]
    else:
        assert rows == [((0, 3),), ((0, 1),), ((0, 1),)] and finished == [(), (), (0,)]


def test_the_clock_waits_for_arrivals_and_ttft_counts_from_arrival():
    sim, res = run([TraceRequest(0.0, 3, 3), TraceRequest(10.0, 2, 1)])
    a, b = res.outputs
    assert (a.ttft_s, a.tpot_s) == (3.0, 1.0)
    assert (b.ttft_s, b.tpot_s, res.elapsed_s) == (2.0, None, 12.0)   # idle 5 s .. 10 s, 2 s of prefill


def test_one_token_prompt_chunks_are_prefill():
    """A budget of one token: the prompt of 5 goes in five one-token steps, all prefill; the two
    decodes after them are not. The scheduler's count agrees with the simulator's, step by step."""
    sim = Simulator([TraceRequest(0.0, 5, 3)], constant_model(), SimConfig(64, 4, max_num_batched_tokens=1))
    counted, schedule = [], sim.scheduler.schedule

    def spy():
        step = schedule()
        counted.append(step.num_prefill_tokens) if step.requests else None
        return step
    sim.scheduler.schedule = spy
    res = sim.run()
    assert [s.num_prefill_tokens for s in res.steps] == [1, 1, 1, 1, 1, 0, 0] == counted
    assert all(s.num_tokens == s.num_seqs == 1 for s in res.steps)


# ---- swap through the real HostSwap -------------------------------------------------------------------
def pressure_trace(n: int = 16, seed: int = 0, groups: bool = False) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        g = int(rng.integers(0, 2)) if groups and rng.random() < 0.6 else None
        own = int(rng.integers(2, 20))
        head = int(rng.integers(4, 12)) if g is not None else 0
        out.append(TraceRequest(0.0, own + head, int(rng.integers(1, 20)), g, head, int(rng.integers(0, 2))))
    return out


def test_swap_time_is_on_the_clock_and_every_page_comes_back():
    """Decode 1 s a step, prefill 1 token/s, no overhead: the run's length is the steps' time plus
    the swap traffic at 1 KB/s (pages of 4 tokens x 250 bytes), and nothing else."""
    model = constant_model(gb_per_s=1e-6, kv_bytes_per_token=250)
    sim, res = run(pressure_trace(), model, num_pages=12, preemption="swap", swap_space=1e-5)
    sw = res.swap
    assert sw.num_pages_out > 0 and sw.num_pages_in > 0
    busy = sum((s.num_tokens > s.num_prefill_tokens) * 1.0 + s.num_prefill_tokens / 1.0 for s in res.steps)
    assert res.elapsed_s == pytest.approx(busy + (sw.num_pages_out + sw.num_pages_in) * 1.0)
    assert sorted(o.request_id for o in res.outputs) == list(range(16))
    assert all(o.num_output_tokens == r.output_len for o, r in zip(sorted(res.outputs), pressure_trace()))
    sw.reclaim(wait=True)
    sw.check_integrity()
    res.pool.check_integrity()
    assert sw.num_free_host_pages == sw.num_host_pages and res.pool.stats().num_used == 0
    assert res.pool.kv.nbytes == 12 * 4 * 4          # 4 bytes a slot: no model K/V in the simulator


def test_auto_preemption_prices_swaps_at_the_modelled_pcie_speed():
    model = constant_model(gb_per_s=3.0, kv_bytes_per_token=1000)
    sim = Simulator(pressure_trace(), model, SimConfig(12, 4, preemption="auto", swap_space=1e-3), vocab_size=97)
    pre = sim.scheduler.preemptor
    assert pre.swap_cost_s(5) is None                # no copy completed yet, as on the engine
    sim.run()
    assert sim.swap.num_pages_out and sim.swap.num_pages_in
    assert pre.swap_cost_s(5) == pytest.approx(model.swap_seconds(5, 5, 4))
    assert pre.prefill_tokens_per_s == pytest.approx(1.0)    # measured off prefill steps, as the engine does


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_seeded_workloads_drain_with_every_page_back(mode):
    for seed in range(6):
        trace = pressure_trace(24, seed, groups=True)
        sim, res = run(trace, num_pages=14, preemption=mode, enable_prefix_caching=True,
                       swap_space=3e-6 if mode != "recompute" else 0.0, max_num_batched_tokens=1 + 5 * seed)
        assert not sim.scheduler.has_unfinished() and len(res.outputs) == len(trace)
        assert [o.num_output_tokens for o in sorted(res.outputs)] == [r.output_len for r in trace]
        assert all(o.ttft_s > 0 and (o.tpot_s is None) == (o.num_output_tokens == 1) for o in res.outputs)
        res.pool.check_integrity()
        assert res.pool.stats().num_used == 0
        assert sum(d.ran != () for d in res.decisions) == len(res.steps)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_step():
    model, ok = constant_model(), [TraceRequest(0.0, 3, 3)]
    with pytest.raises(ValueError, match=r"trace\[1\] needs 5 pages"):
        Simulator(ok + [TraceRequest(0.0, 17, 3)], model, SimConfig(5, 4))
    with pytest.raises(ValueError, match="trace is empty"):
        Simulator([], model, SimConfig(5, 4))
    with pytest.raises(TypeError, match="step_model must be a StepModel"):
        Simulator(ok, {"decode_s": 1}, SimConfig(5, 4))
    with pytest.raises(ValueError, match="prompt 0 has 2 tokens, the trace says 3"):
        Simulator(ok, model, SimConfig(5, 4), prompts=[[1, 2]])
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        SimConfig(5, 3)
    with pytest.raises(ValueError, match="needs swap_space > 0"):
        SimConfig(5, 4, preemption="swap", swap_space=0)
    sim = Simulator(ok, model, SimConfig(5, 4))
    sim.run()
    with pytest.raises(RuntimeError, match="already called"):
        sim.run()
