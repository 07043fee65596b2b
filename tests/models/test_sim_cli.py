"""The simulator makes the engine's decisions, and the ``simulate`` / ``calibrate`` commands.

The real engine (random:tiny on the CPU, async scheduling on and off) is driven over a small
trace with a fake clock: before each ``LLM.step()`` the requests whose arrival the clock has
passed are added, and the clock then advances by the step model's time for the step just
scheduled (computed here from the ScheduledStep the engine's scheduler returned, before the
engine launched it). The simulator replays the same trace and prompts with the same step model.
Every step's decisions must be identical: rows and their query lengths in order, preemptions and
their modes, resumes, demotions, finishes.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from pagemem.models import SamplingParams, load_model
from pagemem.models.cli import main
from pagemem.models.engine import LLM
from pagemem.scheduler import Status
from pagemem.simulator import SimConfig, Simulator, StepModel
from pagemem.traces import PromptSource, TraceRequest, save_trace

PAGE_SIZE, NUM_PAGES, BUDGET, MAX_SEQS = 4, 16, 16, 6
HOST_PAGES = 6                       # a small host pool: some swaps fall back to recompute


@functools.cache
def _tiny():
    return load_model("random:tiny", device="cpu", seed=3)


def _trace(seed: int = 5, n: int = 12) -> list[TraceRequest]:
    """Ragged requests arriving over time, most in one of two shared-prefix groups, two priorities."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for i in range(n):
        t += float(rng.exponential(6.0)) if i else 0.0
        group = int(rng.integers(0, 2)) if rng.random() < 0.7 else None
        own = int(rng.integers(2, 30))
        head = min(own, int(rng.integers(4, 20))) if group is not None else 0
        out.append(TraceRequest(round(t, 3), own + head, int(rng.integers(1, 24)), group, head, int(rng.integers(0, 2))))
    return out


def _step_model(kv_bytes_per_token: int) -> StepModel:
    """The fake clock: decode steps of 1 s, prefill at 100 tokens/s after 0.5 s, swaps at 2 KB/s
    (about a second a page: swap traffic moves later arrivals to other steps)."""
    return StepModel((1,), (1,), ((1.0,),), 100.0, 0.5, 2e-6, 2e-6, kv_bytes_per_token)


def _engine(mode: str, async_scheduling: bool) -> LLM:
    page_bytes = _tiny().pool_config(2, PAGE_SIZE).page_bytes
    return LLM(_tiny(), page_size=PAGE_SIZE, num_pages=NUM_PAGES, swap_space=HOST_PAGES * page_bytes / 2**30,
               max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, preemption=mode, enable_prefix_caching=True,
               async_scheduling=async_scheduling)


def drive_engine(llm: LLM, trace, prompts, model: StepModel) -> list[tuple]:
    """Per ``LLM.step()`` call: (rows, preempted, resumed, demoted, finished), by request id."""
    sched, swap = llm.scheduler, llm.swap
    schedule = sched.schedule
    seen = []

    def timed_schedule():                    # what the step costs, read as it is scheduled
        out0, in0 = (swap.num_pages_out, swap.num_pages_in) if swap else (0, 0)
        step = schedule()
        decode = [r.pages.num_tokens for r, q in zip(step.requests, step.query_lens)
                  if q == 1 and r.pages.num_tokens == r.num_tokens and r.pages.num_tokens > r.num_prompt_tokens]
        swap_s = model.swap_seconds(swap.num_pages_out - out0, swap.num_pages_in - in0, PAGE_SIZE) if swap else 0.0
        busy = model.step_seconds(len(decode), sum(decode), step.num_tokens - len(decode)) if step.requests else 0.0
        seen.append((step, busy + swap_s))
        return step

    sched.schedule = timed_schedule         # this engine's scheduler only
    clock, nxt, reqs, log = 0.0, 0, [], []
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in trace]
    while nxt < len(trace) or llm.has_unfinished():
        if not llm.has_unfinished():
            clock = max(clock, trace[nxt].arrival_s)
        while nxt < len(trace) and trace[nxt].arrival_s <= clock:
            reqs.append(llm.add_request(prompts[nxt], params[nxt], priority=trace[nxt].priority))
            nxt += 1
        before = {r: (r.status, r.num_demotions) for r in reqs}
        seen.clear()
        llm.step()
        step, seconds = seen[0] if seen else (None, 0.0)
        clock += seconds
        log.append(_decision(step, reqs, before))
    assert all(r.status is Status.FINISHED for r in reqs)
    return log


def _decision(step, reqs, before) -> tuple:
    rows = tuple((r.request_id, q) for r, q in zip(step.requests, step.query_lens)) if step else ()
    preempted = tuple((r.request_id, m) for r, m in step.preempted) if step else ()
    resumed = tuple(r.request_id for r in step.resumed) if step else ()
    demoted = tuple(sorted(r.request_id for r in reqs if r in before and r.num_demotions > before[r][1]))
    finished = tuple(sorted(r.request_id for r in reqs if r.status is Status.FINISHED
                            and before.get(r, (None,))[0] is not Status.FINISHED))
    return rows, preempted, resumed, demoted, finished


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_simulator_makes_the_engines_decisions_step_by_step(mode, async_scheduling):
    trace = _trace()
    prompts = list(PromptSource(250, seed=5).prompts(trace))
    llm = _engine(mode, async_scheduling)
    model = _step_model(llm.pool.config.page_bytes // PAGE_SIZE)
    want = drive_engine(llm, trace, prompts, model)
    config = SimConfig(NUM_PAGES, PAGE_SIZE, MAX_SEQS, BUDGET, mode, "lru", True, 0.01, 1, async_scheduling,
                       HOST_PAGES * llm.pool.config.page_bytes / 2**30)
    sim = Simulator(trace, model, config, prompts=prompts, record_decisions=True)
    result = sim.run()
    got = [tuple(d) for d in result.decisions]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"step {i}: simulator {g} != engine {w}"
    # the workload exercises what it is meant to: preemptions, and under swap resumes and demotions
    assert sum(llm.scheduler.num_preemptions.values()) > 0
    if mode == "swap":
        assert llm.swap.num_pages_in > 0 and llm.scheduler.num_demotions > 0
        assert llm.scheduler.num_preemptions["recompute"] > llm.scheduler.num_demotions   # host-full fallback too
    assert result.scheduler.num_preemptions == llm.scheduler.num_preemptions
    assert llm.prefix_cache.stats().num_hit_tokens == result.prefix_cache.stats().num_hit_tokens > 0


def test_simulate_prints_the_summary_pagemem_run_prints(tmp_path, capsys):
    """The same flags: the figures decided by scheduling (steps, pages, swaps, preemptions, hits)
    are the engine's; only times and bytes are the step model's."""
    runs = {}
    for cmd in ("run", "simulate"):
        path = tmp_path / f"{cmd}.json"
        assert main([cmd, "--dataset", "prefix-repetition", "--num-prompts", "24", "--json", str(path),
                     "--no-progress"]) == 0
        runs[cmd] = json.loads(path.read_text())
    out = capsys.readouterr().out
    assert out.count("preemptions") == 2 and out.count("output tokens/s") == 2
    same = ["num_steps", "decode_steps", "prefill_steps", "prefill_tokens", "peak_pages_used", "mean_fragmentation",
            "pages_swapped_out", "pages_swapped_in", "preemptions_swap", "preemptions_recompute", "demotions",
            "prefix_hit_tokens", "output_tokens", "input_tokens"]
    assert {k: runs["simulate"][k] for k in same} == {k: runs["run"][k] for k in same}
    assert runs["run"]["pages_swapped_out"] > 0


def test_simulate_replays_a_trace_file_and_writes_json_and_plot(tmp_path):
    trace, path = _trace(), tmp_path / "t.jsonl"
    save_trace(path, trace)
    js, png = tmp_path / "s.json", tmp_path / "p.png"
    assert main(["simulate", "--trace", str(path), "--num-pages", "17", "--page-size", "4", "--reservations",
                 "--max-model-len", "64", "--json", str(js), "--plot", str(png), "--no-progress"]) == 0
    s = json.loads(js.read_text())
    assert s["num_requests"] == len(trace) and s["output_tokens"] == sum(r.output_len for r in trace)
    assert [r["allocator"] for r in s["reservations"]] == ["paged", "max", "pow2", "exact"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--trace", "/no/such.jsonl"], "No such file"),
    (["--num-pages", "3", "--input-len", "200"], "needs"),
    (["--model", "random:llama-3.2-1b"], "--num-pages or --kv-memory-gib"),
    (["--dataset", "sharegpt", "--prefix-share", "2"], "--prefix-share"),
])
def test_simulate_bad_input_is_a_message_and_exit_2(capsys, argv, message):
    assert main(["simulate", "--no-progress", "--num-prompts", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_simulate_reports_a_bad_trace_line(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 4, "output_len": 2}\n{"arrival_s": 1, "prompt_len": 0, "output_len": 2}\n')
    assert main(["simulate", "--trace", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "prompt_len" in err


def test_calibrate_on_the_cpu_writes_a_step_model_simulate_loads(tmp_path, capsys):
    out = tmp_path / "step_model.json"
    assert main(["calibrate", "--model", "random:tiny", "--device", "cpu", "--batch-sizes", "1,2",
                 "--context-lens", "8,16", "--decode-steps", "3", "--prefill-tokens", "16,32",
                 "--prefill-prompt-len", "8", "--swap-pages", "4", "--repeats", "2", "--out", str(out)]) == 0
    model = StepModel.load(out)
    assert model.decode_batch == (1, 2) and model.decode_context == (8 + 1 + 1, 16 + 1 + 1)
    assert all(t > 0 for row in model.decode_s for t in row)
    tiny = _tiny().pool_config(2, 16)
    assert model.kv_bytes_per_token == tiny.page_bytes // 16
    assert model.prefill_tokens_per_s > 0 and model.pcie_out_gb_per_s > 0 and model.pcie_in_gb_per_s > 0
    assert model.meta["model"] == "random:tiny" and model.meta["page_size"] == 16
    js = tmp_path / "s.json"
    assert main(["simulate", "--step-model", str(out), "--num-prompts", "8", "--json", str(js), "--no-progress"]) == 0
    assert json.loads(js.read_text())["step_model"]["model"] == "random:tiny"


def test_simulate_seed_draws_the_trace(tmp_path):
    """--seed picks the trace simulate draws: the same seed writes the same trace, another seed
    another one."""
    traces = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        path = tmp_path / f"{name}.jsonl"
        assert main(["simulate", "--dataset", "alpaca", "--num-prompts", "12", "--request-rate", "5",
                     "--seed", seed, "--save-trace", str(path), "--no-progress"]) == 0
        traces[name] = path.read_text()
    assert traces["a"] == traces["b"] != traces["c"]


def test_calibrate_measures_a_batch_whose_prompts_take_several_prefill_steps(tmp_path):
    """40 prompts of 2048 tokens prefill over 5 steps of 16,384 tokens: the first prompts finish
    and decode while the last ones prefill. Their requests must still be running when the
    last prompt is done, or no step decodes the whole batch (the default grid's 256 x 2048 did this)."""
    out = tmp_path / "step_model.json"
    assert main(["calibrate", "--model", "random:tiny", "--device", "cpu", "--batch-sizes", "40",
                 "--context-lens", "2048", "--decode-steps", "2", "--prefill-tokens", "16",
                 "--prefill-prompt-len", "8", "--swap-pages", "2", "--repeats", "1", "--out", str(out)]) == 0
    model = StepModel.load(out)
    assert model.decode_batch == (40,) and model.decode_s[0][0] > 0
