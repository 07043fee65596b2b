"""LLM engine: greedy outputs do not depend on how the pool was managed (preemption mode, pool
size, prefix caching), and match the simple prefill-then-decode loop."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.engine import LLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny", device="cpu", seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    shared = rng.integers(0, 256, 40).tolist()          # a prefix shared by half the prompts
    return [(shared if i % 2 else []) + rng.integers(0, 256, rng.integers(8, 60)).tolist() for i in range(12)]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return generate(tiny, prompts, GREEDY)


def run(tiny, prompts, **kw):
    llm = LLM(tiny, **kw)
    outs = llm.generate(prompts, GREEDY)
    llm.pool.check_integrity()
    if llm.swap is not None:
        llm.swap.reclaim(wait=True)
        llm.swap.check_integrity()
    return [o.token_ids for o in outs], llm


def test_big_pool_matches_simple_loop(tiny, prompts, reference):
    outs, llm = run(tiny, prompts, num_pages=512, swap_space=0)
    assert outs == reference
    assert sum(llm.scheduler.num_preemptions.values()) == 0


@pytest.mark.parametrize("mode, host_pages, swaps, recomputes", [
    ("swap", 1310, True, False),
    ("recompute", None, False, True),
    ("auto", 4, True, True),
])
def test_oversubscribed_pool_gives_identical_outputs(tiny, prompts, reference, mode, host_pages, swaps, recomputes):
    """About 65 pages of demand (12 requests of 4 to 8 pages) on a pool of 16: 4x oversubscribed.
    "auto" gets a host pool of 4 pages: it swaps while the host has room and recomputes when it
    has not, so both of its modes serve requests here."""
    swap_space = 0 if host_pages is None else host_pages * 8192 / 2**30     # 8 KiB a page of 16 tokens
    outs, llm = run(tiny, prompts, num_pages=17, page_size=16, preemption=mode, swap_space=swap_space,
                    max_num_batched_tokens=64)
    assert outs == reference
    pre = llm.scheduler.num_preemptions
    assert (pre["swap"] > 0, pre["recompute"] > 0) == (swaps, recomputes), pre
    if swaps:
        assert llm.swap.num_host_pages == host_pages
        assert llm.swap.num_pages_out > 0 and llm.swap.num_pages_in == llm.swap.num_pages_out


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_prefix_caching_gives_identical_outputs_and_hits(tiny, prompts, reference, mode):
    outs, llm = run(tiny, prompts, num_pages=40, page_size=8, preemption=mode, swap_space=0.01,
                    enable_prefix_caching=True, max_num_batched_tokens=64)
    assert outs == reference
    assert llm.prefix_cache.stats().num_hit_tokens > 0


def test_outputs_carry_text_timings_and_counts(tiny):
    llm = LLM(tiny, num_pages=64, swap_space=0)
    (out,) = llm.generate("Hello, pages", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert out.prompt == "Hello, pages" and len(out.token_ids) == 5
    assert out.text == tiny.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length"
    assert 0 < out.ttft_s and 0 <= out.tpot_s and out.num_preemptions == 0


def test_seeded_sampling_is_reproducible(tiny, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=11, ignore_eos=True)
    a = [o.token_ids for o in LLM(tiny, num_pages=256, swap_space=0).generate(prompts[:4], params)]
    b = [o.token_ids for o in LLM(tiny, num_pages=17, preemption="recompute", swap_space=0,
                                  max_num_batched_tokens=32).generate(prompts[:4], params)]
    assert a == b


def test_bad_requests(tiny):
    llm = LLM(tiny, num_pages=4, page_size=4, swap_space=0)
    with pytest.raises(ValueError, match="needs .* pages"):
        llm.generate([list(range(30))], GREEDY)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate([[1] * 4000], SamplingParams(max_tokens=200))
    with pytest.raises(ValueError, match="needs swap_space"):
        LLM(tiny, num_pages=8, preemption="swap", swap_space=0)
    for bad in (3, 6, 12):
        with pytest.raises(ValueError, match="page_size must be a power of two"):
            LLM(tiny, num_pages=8, page_size=bad, swap_space=0)
    for bad, exc in ((0, ValueError), (-4, ValueError), (2.0, TypeError), ("4", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="page_size"):
            LLM(tiny, num_pages=8, page_size=bad, swap_space=0)


def test_failed_generate_queues_nothing(tiny):
    llm = LLM(tiny, num_pages=8, page_size=4, swap_space=0)
    with pytest.raises(ValueError, match="needs"):
        llm.generate([[1, 2, 3], list(range(40))], GREEDY)      # the second can never fit
    assert not llm.scheduler.has_unfinished() and not llm._states
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_ttft_and_tpot_follow_the_schedule(tiny, prompts, monkeypatch):
    """Under a clock that ticks once a reading, each request's TTFT is the reading at which its
    first id came in minus the run's start, and its TPOT the span to its last id over the ids
    after the first, both from arrivals recorded apart from the engine. With one sequence at a
    time, each request's first token comes after the previous one's last."""
    import itertools
    import types
    from pagemem.models import engine
    ticks = itertools.count(1)
    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] = float(next(ticks))
        return clock["now"]

    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=perf_counter))
    llm = LLM(tiny, num_pages=64, swap_space=0, max_num_seqs=1)
    arrivals: dict[int, list[float]] = {}
    resolve = llm.scheduler.resolve

    def record(keep):            # called by the engine right after it reads the clock for these ids
        for req in keep:
            arrivals.setdefault(req.request_id, []).append(clock["now"])
        return resolve(keep)

    llm.scheduler.resolve = record
    outs = llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    start = llm.stats.start_t
    for out in outs:
        seen = arrivals[out.request_id]
        assert len(seen) == len(out.token_ids) == 6
        assert out.ttft_s == seen[0] - start
        assert out.tpot_s == (seen[-1] - seen[0]) / 5
    for a, b in zip(outs, outs[1:]):
        assert arrivals[b.request_id][0] > arrivals[a.request_id][-1]
    assert llm.stats.end_t > max(s[-1] for s in arrivals.values())


def test_summary_reports_each_run_alone(tiny, prompts):
    from pagemem.models.summary import summarize
    llm = LLM(tiny, num_pages=17, preemption="swap", swap_space=0.01, max_num_batched_tokens=64)
    first = summarize(llm, llm.generate(prompts, GREEDY))
    second = summarize(llm, llm.generate(prompts, GREEDY))
    assert first["pages_swapped_out"] > 0
    assert second["pages_swapped_out"] == first["pages_swapped_out"]      # same work, not cumulative
    assert second["preemptions_swap"] == first["preemptions_swap"]
    assert 0 < first["peak_pages_used"] <= 16 and 0 <= first["mean_fragmentation"] < 1


def test_warmup_is_a_no_op_on_the_cpu():
    from pagemem.models.engine import LLM
    llm = LLM("random:tiny", device="cpu", num_pages=64, swap_space=0)
    llm.warmup(128)
    assert llm.stats.steps == [] and llm.pool.stats().num_used == 0


@pytest.mark.parametrize("kw", [dict(num_pages=512, swap_space=0),
                                dict(num_pages=17, page_size=16, preemption="swap", swap_space=0.01,
                                     max_num_batched_tokens=64),
                                dict(num_pages=17, page_size=16, preemption="recompute", swap_space=0,
                                     max_num_batched_tokens=64)],
                         ids=["big-pool", "swap", "recompute"])
def test_async_scheduling_stops_like_the_simple_loop(tiny, prompts, reference, kw):
    """Requests that end on a stop token (one sampled while the next step was already queued)
    end exactly where the simple loop ends them, with async scheduling on and off."""
    counts = {}
    for out in reference:
        for t in set(out[3:20]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)                      # a token several requests reach mid-way
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=(stop,))
    want = generate(tiny, prompts, params)
    assert any(len(w) < 24 for w in want) and any(len(w) == 24 for w in want)
    for flag in (True, False):
        llm = LLM(tiny, async_scheduling=flag, **kw)
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        assert [o.finish_reason for o in outs] == ["stop" if len(w) < 24 else "length" for w in want]
        assert not llm.has_unfinished()
        llm.pool.check_integrity()
        assert llm.pool.stats().num_used == 0
        assert all(r.num_pending == 0 for r in llm.scheduler.running)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                                    SamplingParams(temperature=0.7, top_k=20, max_tokens=3, seed=1, ignore_eos=True)],
                         ids=["greedy", "sampled"])
def test_async_scheduling_keeps_one_step_in_flight(tiny, params):
    """Greedy and sampled ids alike stay on the device for one step; without async scheduling
    each step's id is taken in at once."""
    llm = LLM(tiny, num_pages=64, swap_space=0)
    llm.add_request([1, 2, 3], params)
    llm.step()                                                     # prefill queued, its id in flight
    assert llm._inflight is not None and llm._inflight.collect_later
    (req,) = llm.scheduler.running
    assert req.num_pending == 1 and len(req.token_ids) == 3
    llm.step()                                                     # decode queued, prefill's id in
    assert len(req.token_ids) == 4 and req.num_pending == 1
    while llm.has_unfinished():
        llm.step()
    assert req.num_output_tokens == 3 and req.num_pending == 0
    sync = LLM(tiny, num_pages=64, swap_space=0, async_scheduling=False)
    sync.add_request([1, 2, 3], params)
    sync.step()                                                    # no lag
    assert sync._inflight is None and len(sync.scheduler.running[0].token_ids) == 4
