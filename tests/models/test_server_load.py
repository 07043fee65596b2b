"""pagemem serve under load on loopback (random:tiny on the CPU): 64 concurrent streaming clients
of mixed lengths on a pool small enough to force preemption by swap, some of them leaving
mid-stream. Every client that stays gets the greedy tokens of an offline LLM.generate of its
request; every page is free at the end and both integrity checks pass; /metrics shows the swaps
and preemptions the engine counted. And a request that arrives while another runs joins the
running batch; a client that leaves has its request aborted. A failed engine step fails the
call it was serving, and the next call is served as if nothing had happened; an engine whose
steps keep failing stops taking calls."""
from __future__ import annotations

import asyncio
import time

import httpx2
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagemem.models import LLM, SamplingParams
from pagemem.models.server_process import ServerProcess

SMALL_POOL = ["--model", "random:tiny", "--device", "cpu", "--num-pages", "48", "--page-size", "8",
              "--preemption", "swap", "--swap-space", "0.05", "--max-num-batched-tokens", "128",
              "--debug-endpoints", "--log-level", "warning"]
NUM_CLIENTS = 64
QUITTERS = set(range(3, NUM_CLIENTS, 8))      # these read 3 chunks, then close the stream


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not in /metrics")


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """The /debug/pool report once no request is left in the engine (polls; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        report = httpx2.get(url + "/debug/pool", timeout=30).raise_for_status().json()
        if not report["has_unfinished"] and report["num_live_choices"] == 0:
            return report
        assert time.monotonic() < deadline, f"the engine is still busy: {report}"
        time.sleep(0.05)


def workload():
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 256, rng.integers(8, 61)).tolist() for _ in range(NUM_CLIENTS)]
    lengths = [120 if i in QUITTERS else int(rng.integers(4, 49)) for i in range(NUM_CLIENTS)]
    return prompts, lengths


async def one_client(client, prompt: list[int], max_tokens: int, quit_after: int | None):
    """(token ids received, finish reason) of one streaming client."""
    stream = await client.completions.create(model="random:tiny", prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.0, stream=True,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
    ids, reason, chunks = [], None, 0
    async for chunk in stream:
        c = chunk.choices[0]
        ids += c.token_ids
        reason = c.finish_reason or reason
        chunks += 1
        if quit_after is not None and chunks >= quit_after:
            await stream.close()
            break
    return ids, reason


async def all_clients(base_url: str, prompts, lengths):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        return await asyncio.gather(*(one_client(client, p, n, 3 if i in QUITTERS else None)
                                      for i, (p, n) in enumerate(zip(prompts, lengths))))
    finally:
        await client.close()


def test_64_streaming_clients_on_a_small_pool(tmp_path):
    prompts, lengths = workload()
    ref = LLM("random:tiny", device="cpu", num_pages=1024, swap_space=0).generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths])
    with ServerProcess(SMALL_POOL, tmp_path / "load.log") as srv:
        results = asyncio.run(all_clients(srv.base_url, prompts, lengths))
        report = wait_idle(srv.url)
        text = httpx2.get(srv.url + "/metrics").text
    for i, ((ids, reason), want) in enumerate(zip(results, ref)):
        if i in QUITTERS:
            assert reason is None and 0 < len(ids) < lengths[i] and ids == want.token_ids[:len(ids)], i
        else:
            assert (ids, reason) == (want.token_ids, "length"), i
    assert report["num_used"] == report["num_cached"] == 0 and report["num_free"] == report["num_pages"]
    c = report["counters"]
    assert c["preempt_swap"] > 0 and c["pages_out"] > 0
    assert metric(text, "pagemem_preemptions_total", mode="swap") == c["preempt_swap"]
    assert metric(text, "pagemem_preemptions_total", mode="recompute") == c["preempt_recompute"]
    for direction, key in (("out", "pages_out"), ("in", "pages_in")):
        assert metric(text, "pagemem_swap_pages_total", direction=direction) == c[key]
        assert metric(text, "pagemem_swap_bytes_total", direction=direction) == c[key] * report["page_bytes"]
    assert metric(text, "pagemem_pages", state="used") == 0
    assert metric(text, "pagemem_pages", state="free") == report["num_pages"]
    assert metric(text, "pagemem_requests_running") == metric(text, "pagemem_requests_swapped") == 0
    assert metric(text, "pagemem_requests_finished_total", finish_reason="abort") == len(QUITTERS)
    assert metric(text, "pagemem_requests_finished_total", finish_reason="length") == NUM_CLIENTS - len(QUITTERS)
    assert metric(text, "pagemem_time_to_first_token_seconds_count") == NUM_CLIENTS
    assert metric(text, "pagemem_generation_tokens_total") >= sum(n for i, n in enumerate(lengths) if i not in QUITTERS)


ROOMY = ["--model", "random:tiny", "--device", "cpu", "--num-pages", "256", "--page-size", "16",
         "--enable-prefix-caching", "--debug-endpoints", "--log-level", "warning"]


def test_a_new_request_joins_the_running_batch_and_a_leaving_client_aborts(tmp_path):
    with ServerProcess(ROOMY, tmp_path / "roomy.log") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
        for _ in range(2):                                  # the second finds the first's full pages cached
            client.completions.create(model="random:tiny", prompt=list(range(64)), max_tokens=1)
        long = client.completions.create(model="random:tiny", prompt="a", max_tokens=4000, temperature=0.0,
                                         stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        next(iter(long))                                   # 4000 tokens to go
        short = client.completions.create(model="random:tiny", prompt="b", max_tokens=4, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert short.choices[0].finish_reason == "length"
        during = httpx2.get(srv.url + "/debug/pool").json()
        assert during["num_live_choices"] == 1             # done while the long one still runs: it joined
        long.close()                                       # the client leaves mid-stream
        wait_idle(srv.url)
        first = metric(httpx2.get(srv.url + "/metrics").text, "pagemem_generation_tokens_total") - 4 - 2
        with pytest.raises(httpx2.ReadTimeout):             # a plain call whose client gives up waiting
            httpx2.post(srv.url + "/v1/completions", json={"prompt": "c", "max_tokens": 4000, "ignore_eos": True},
                        timeout=httpx2.Timeout(30, read=0.5))
        report = wait_idle(srv.url)
        text = httpx2.get(srv.url + "/metrics").text
    assert report["num_used"] == 0 and report["num_free"] + report["num_cached"] == report["num_pages"]
    hits = report["counters"]["prefix_hit_tokens"]
    assert hits >= 48 and metric(text, "pagemem_prefix_cache_hit_tokens_total") == hits
    assert metric(text, "pagemem_pages", state="cached") == report["num_cached"] > 0
    assert metric(text, "pagemem_requests_finished_total", finish_reason="abort") == 2
    second = metric(text, "pagemem_generation_tokens_total") - 4 - 2 - first
    assert first < 4000 and second < 4000                   # each aborted well before its end


@pytest.mark.gpu
def test_greedy_streams_on_a_gpu_equal_the_offline_engine(tmp_path):
    """The same 64 clients with the engine on CUDA (CUDA graphs, async scheduling, swap on real
    streams), in float32 so that batch composition cannot flip a near-tie."""
    prompts, lengths = workload()
    args = list(SMALL_POOL) + ["--dtype", "float32"]
    args[args.index("--device") + 1] = "cuda"
    ref = LLM("random:tiny", dtype="float32", device="cuda", num_pages=1024, swap_space=0, cuda_graph=False).generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths])
    with ServerProcess(args, tmp_path / "gpu.log") as srv:
        results = asyncio.run(all_clients(srv.base_url, prompts, lengths))
        report = wait_idle(srv.url)
    for i, ((ids, _), want) in enumerate(zip(results, ref)):
        assert ids == want.token_ids[:len(ids)] and (i in QUITTERS or ids == want.token_ids), i
    assert report["num_used"] == 0 and report["counters"]["pages_out"] > 0


def test_a_failed_step_fails_its_call_not_the_next_and_a_broken_engine_stops():
    """The engine loop in this process, on an engine whose step raises when told to."""
    from pagemem.models.server_engine import MAX_FAILED_STEPS, ChoiceSpec, EngineFailure, EngineLoop, Job

    llm = LLM("random:tiny", device="cpu", num_pages=64, swap_space=0)
    real_step, failing = llm.step, set()

    def step():
        step.calls += 1
        if step.calls in failing or "always" in failing:
            raise RuntimeError("planted step failure")
        return real_step()
    step.calls = 0
    llm.step = step                                    # this test's own engine only
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = LLM("random:tiny", device="cpu", num_pages=64, swap_space=0).generate([[1, 2, 3]], params)[0].token_ids

    async def call(engine) -> list:
        job = Job([ChoiceSpec([1, 2, 3], params)])
        engine.submit(job)
        await job.accepted
        items = []
        while not items or not (isinstance(items[-1], EngineFailure) or items[-1].finish_reason):
            items.append(await asyncio.wait_for(job.events.get(), 60))
        return items

    async def scenario(engine):
        failing.add(3)
        first = await call(engine)                     # its third step fails
        second = await call(engine)                    # served as if nothing had happened
        failing.add("always")
        broken = [await call(engine) for _ in range(MAX_FAILED_STEPS)]   # every step fails from now on
        with pytest.raises(EngineFailure):
            await call(engine)                         # refused at once: the engine has stopped
        return first, second, broken

    engine = EngineLoop(llm, max_waiting=8)
    engine.start()
    first, second, broken = asyncio.run(scenario(engine))
    assert isinstance(first[-1], EngineFailure) and all(isinstance(b[-1], EngineFailure) for b in broken)
    assert [t for d in second for t in d.token_ids] == want and second[-1].finish_reason == "length"
    assert "3 steps failed in a row" in engine.failure     # it gave up by itself (stop() only joins it here)
    engine.stop()
    assert not engine.alive
    llm.pool.check_integrity()
    assert llm.pool.stats().num_used == 0
