"""Async scheduling under adversarial workloads: an engine that queues step N+1 before step N's
sampled ids reach the host must serve every request exactly as the same engine syncing ids each
step, and as the simple prefill-then-decode loop (``pagemem.models.generate``).

Workloads are drawn by hypothesis: ragged prompts (some sharing a prefix), per-request max_tokens,
stop tokens taken from the greedy continuation itself (so requests stop early, some on their very
first token), EOS with and without ``ignore_eos``, pools down to one request's worth of pages,
page sizes 1 to 16, swap / recompute / auto preemption (with a host pool of one page, so swap
falls back to recompute), prefix caching, chunked prefill, few sequence slots, batched admission
and a watermark. Token ids and finish reasons must agree; afterwards the pool and host swap must
be whole and nothing left unfinished or pending.

Greedy outputs are compared token for token; two runs may part only at a near tie of the logits
(tests/models/_oracle.py: within BATCH_MARGIN = 1e-4 on one unbatched prefill), since batching
moves float32 logits by up to about 2e-6 and a tie that close may go either way.

Hand-driven runs add requests between steps, while a step is in flight, with priorities and
seeded or unseeded sampling mixed with greedy rows, and check after every step what one step in
flight allows: at most one pending id per request, only for requests of the step in flight; no
known id ever withdrawn; a request whose known ids end it (stop, EOS, max_tokens) already retired.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis_budget import scaled

from _oracle import assert_same_greedy, ours
from pagemem import kernels
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.engine import LLM
from pagemem import pack_batch
from pagemem.scheduler import Status

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def _tiny(seed: int = 3):
    return load_model("random:tiny", device="cpu", seed=seed)


def _with_eos(model, eos: tuple[int, ...]):
    """The same weights with other EOS ids, so that EOS comes up often in greedy continuations."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=tuple(eos)))


def _greedy(max_tokens: int, stops=(), ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=tuple(stops), ignore_eos=ignore_eos)


def _expected_reason(ids: list[int], sp: SamplingParams, eos) -> str:
    """Finish reason of a reference output, from its tokens alone."""
    ends = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
    assert not ends & set(ids[:-1]), "the reference ran past a stop token"
    if ids[-1] in ends:
        return "stop"
    assert len(ids) == sp.max_tokens
    return "length"


def _pages_for(prompts, params, page_size: int) -> int:
    """Pages the largest request needs: the least a pool may have (plus the null page)."""
    return max(-(-(len(p) + sp.max_tokens) // page_size) for p, sp in zip(prompts, params))


def _check_whole(llm: LLM, reqs=()) -> None:
    assert not llm.has_unfinished() and llm._inflight is None
    s = llm.scheduler
    assert not (s.running or s.waiting or s.swapped)
    assert all(r.status is Status.FINISHED and r.num_pending == 0 and r.pages is None for r in reqs)
    llm.pool.check_integrity()
    assert llm.pool.stats().num_used == 0        # prefix-cached pages stay, evictable only
    if llm.swap is not None:
        llm.swap.reclaim(wait=True)
        llm.swap.check_integrity()
        assert llm.swap.num_free_host_pages == llm.swap.num_host_pages     # no host copy left behind


# ---- workloads ----------------------------------------------------------------------------------
@st.composite
def prompt_sets(draw, max_requests: int = 8, max_len: int = 28):
    shared = draw(st.lists(st.integers(0, 258), min_size=0, max_size=20))
    n = draw(st.integers(1, max_requests))
    return [(shared if draw(st.booleans()) else []) + draw(st.lists(st.integers(0, 258), min_size=1, max_size=max_len))
            for _ in range(n)]


def _stops(data, continuation: list[int]) -> tuple[int, ...]:
    """No stop token, the first sampled token, or one or two tokens of the greedy continuation."""
    kind = data.draw(st.sampled_from(["none", "none", "first", "any"]))
    if kind == "none":
        return ()
    if kind == "first":
        return (continuation[0],)
    return tuple(data.draw(st.lists(st.sampled_from(continuation), min_size=1, max_size=2)))


def _engine_kwargs(data, prompts, params) -> dict:
    page_size = data.draw(st.sampled_from([1, 2, 4, 8, 16]), label="page_size")
    need = _pages_for(prompts, params, page_size)
    total = sum(-(-(len(p) + sp.max_tokens) // page_size) for p, sp in zip(prompts, params))
    slack = data.draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(0, max(0, total - need))), label="slack")
    mode = data.draw(st.sampled_from(["swap", "recompute", "auto"]), label="preemption")
    swap = data.draw(st.sampled_from([0, 0.01] if mode == "recompute" else [1e-6, 0.01]), label="swap_space")
    return dict(page_size=page_size, num_pages=need + 1 + slack, preemption=mode, swap_space=swap,
                enable_prefix_caching=data.draw(st.booleans(), label="prefix_caching"),
                max_num_batched_tokens=data.draw(st.sampled_from([1, 2, 3, 7, 16, 64, 2048]), label="budget"),
                max_num_seqs=data.draw(st.sampled_from([1, 2, 3, 256]), label="max_num_seqs"),
                admit_batch=data.draw(st.sampled_from([1, 2, 3]), label="admit_batch"),
                watermark=data.draw(st.sampled_from([0.0, 0.01, 0.3]), label="watermark"))


def _greedy_workload(data, max_requests: int = 8, max_len: int = 28, max_out: int = 20):
    """(model, prompts, params) with stop tokens and EOS ids picked from the greedy continuations."""
    prompts = data.draw(prompt_sets(max_requests, max_len), label="prompts")
    n = len(prompts)
    limits = data.draw(st.lists(st.integers(1, max_out), min_size=n, max_size=n), label="max_tokens")
    model = _tiny()
    base = generate(model, prompts, [_greedy(m) for m in limits])
    if data.draw(st.booleans(), label="remap_eos"):     # EOS ids that greedy decoding reaches
        eos = data.draw(st.lists(st.sampled_from(sum(base, [])), min_size=1, max_size=2), label="eos")
        model = _with_eos(model, eos)
    params = [_greedy(m, _stops(data, b), ignore_eos=data.draw(st.booleans())) for b, m in zip(base, limits)]
    return model, prompts, params


def _serve(model, prompts, params, **kw):
    llm = LLM(model, **kw)
    reqs, add = [], llm.scheduler.add
    llm.scheduler.add = lambda *a, **k: reqs.append(add(*a, **k)) or reqs[-1]
    outs = llm.generate(prompts, params)
    _check_whole(llm, reqs)
    assert [o.prompt_token_ids for o in outs] == [list(p) for p in prompts]
    return [(o.token_ids, o.finish_reason) for o in outs], llm


# ---- properties ---------------------------------------------------------------------------------
@settings(max_examples=scaled(200), **SETTINGS)
@given(st.data())
def test_greedy_workloads_match_sync_and_the_simple_loop(data):
    model, prompts, params = _greedy_workload(data)
    kw = _engine_kwargs(data, prompts, params)
    want = [(w, _expected_reason(w, sp, model.eos_token_ids))
            for w, sp in zip(generate(model, prompts, params), params)]
    got_async, _ = _serve(model, prompts, params, async_scheduling=True, **kw)
    got_sync, _ = _serve(model, prompts, params, async_scheduling=False, **kw)
    assert_same_greedy(ours(model), prompts, got_async, want)
    assert_same_greedy(ours(model), prompts, got_sync, want)


def test_a_near_tie_may_part_the_engine_from_the_simple_loop():
    """The example that made the exact comparison flaky: the second prompt alone (max_num_seqs=1)
    picks 117, batched with the first (the simple loop) 187; their logits are 9.5e-7 apart on one
    unbatched prefill. The comparison accepts the near tie and nothing wider."""
    model, prompts = _tiny(), [[0, 0, 0, 0, 0, 0], [238, 50, 240, 227]]
    params = [_greedy(1), _greedy(1)]
    want = [(w, "length") for w in generate(model, prompts, params)]
    got, _ = _serve(model, prompts, params, page_size=1, num_pages=8, preemption="swap", swap_space=1e-6,
                    max_num_batched_tokens=1, max_num_seqs=1)
    row = ours(model)(prompts[1])[-1]
    gap = abs(float(row[117]) - float(row[187]))     # how near depends on the platform's float32 sums
    assert gap < 2e-6 and {got[1][0][0], want[1][0][0]} <= {117, 187}
    assert assert_same_greedy(ours(model), prompts, got, want) == (got != want)
    other = ([187 if got[1][0][0] == 117 else 117], "length")
    assert assert_same_greedy(ours(model), prompts, [got[0], other], got, margin=2e-6) == 1
    if gap > 0:                                       # a margin under the gap refuses the same pair
        with pytest.raises(AssertionError, match="not within"):
            assert_same_greedy(ours(model), prompts, [got[0], other], got, margin=gap / 2)
    with pytest.raises(AssertionError, match="not within 0.0001"):              # far from a tie
        assert_same_greedy(ours(model), prompts, [got[0], ([int(row.argmin())], "length")], got)
    with pytest.raises(AssertionError, match="same tokens, different end"):
        assert_same_greedy(ours(model), prompts, [got[0], (got[1][0], "stop")], got)


@settings(max_examples=scaled(80), **SETTINGS)
@given(st.data())
def test_seeded_sampling_mixed_with_greedy_is_unchanged_by_async_scheduling(data):
    """Rows that sample with a temperature are taken in at once; the greedy rows beside them, and
    the seeded draws, must come out the same as with ids synced every step and as the simple loop."""
    prompts = data.draw(prompt_sets(6, 24), label="prompts")
    params = []
    for i in range(len(prompts)):
        m = data.draw(st.integers(1, 16))
        if data.draw(st.booleans()):
            params.append(_greedy(m))
        else:
            params.append(SamplingParams(temperature=data.draw(st.sampled_from([0.5, 1.0, 1.5])),
                                         top_k=data.draw(st.sampled_from([0, 1, 8])),
                                         top_p=data.draw(st.sampled_from([1.0, 0.9])), max_tokens=m,
                                         seed=data.draw(st.integers(0, 2**31)), ignore_eos=True,
                                         stop_token_ids=data.draw(st.lists(st.integers(0, 258), max_size=3))))
    kw = _engine_kwargs(data, prompts, params)
    want = [(w, _expected_reason(w, sp, ())) for w, sp in zip(generate(_tiny(), prompts, params), params)]
    got_async, _ = _serve(_tiny(), prompts, params, async_scheduling=True, **kw)
    got_sync, _ = _serve(_tiny(), prompts, params, async_scheduling=False, **kw)
    assert got_async == got_sync == want


def _drive(model, arrivals, async_scheduling: bool, **kw):
    """Feed ``arrivals`` [(tick, prompt, params, priority)] with add_request as the ticks come,
    one step() per tick, then drain. Checks the one-step-in-flight invariants after every step.
    Returns (outputs, sum of step()'s return values, how many steps were left in flight)."""
    llm = LLM(model, async_scheduling=async_scheduling, seed=5, **kw)
    queue, reqs, seen = list(arrivals), [], {}
    finished = in_flight = tick = 0
    while queue or llm.has_unfinished():
        while queue and queue[0][0] <= tick:
            _, prompt, sp, priority = queue.pop(0)
            reqs.append(llm.add_request(prompt, sp, priority))
        if llm.has_unfinished():
            finished += llm.step()
            in_flight += llm._inflight is not None
            _check_step(llm, reqs, seen)
        tick += 1
        assert tick < 20_000, "no progress"
    _check_whole(llm, reqs)
    outs = [llm._output(r) for r in reqs]
    for r, out in zip(reqs, outs):
        assert seen.get(r, []) == out.token_ids[:len(seen.get(r, []))]     # no id withdrawn at the end
    return [(o.token_ids, o.finish_reason) for o in outs], finished, in_flight


def _check_step(llm: LLM, reqs, seen: dict) -> None:
    flying = set(llm._inflight.sampled) if llm._inflight is not None else set()
    eos = llm.model.eos_token_ids
    for r in reqs:
        sp = llm._states[r].params
        assert 0 <= r.num_pending <= 1
        if r.num_pending:
            assert r in flying, f"request {r.request_id} has an id pending outside the step in flight"
        known = r.token_ids[r.num_prompt_tokens:]
        before = seen.get(r, [])
        assert known[:len(before)] == before, "a known id was withdrawn"
        seen[r] = list(known)
        assert len(known) + r.num_pending <= sp.max_tokens
        ends = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
        if known and (known[-1] in ends or len(known) == sp.max_tokens):
            assert r.status is Status.FINISHED and r.pages is None, \
                f"request {r.request_id} ended ({known[-1]}, {len(known)}/{sp.max_tokens}) but is {r.status}"
            assert r not in llm.scheduler.running + llm.scheduler.waiting + llm.scheduler.swapped
        assert not ends & set(known[:-1])
    llm.pool.check_integrity()


@settings(max_examples=scaled(120), **SETTINGS)
@given(st.data())
def test_hand_driven_arrivals_match_a_sync_engine_fed_the_same_way(data):
    model, prompts, params = _greedy_workload(data, max_requests=7, max_len=24, max_out=16)
    for i in data.draw(st.lists(st.integers(0, len(params) - 1), max_size=3, unique=True), label="sampled"):
        seed = data.draw(st.one_of(st.none(), st.integers(0, 2**31)))   # unseeded: the engine's seed
        params[i] = dataclasses.replace(params[i], temperature=data.draw(st.sampled_from([0.7, 1.3])),
                                        top_k=data.draw(st.sampled_from([0, 1, 5])), seed=seed)
    kw = _engine_kwargs(data, prompts, params)
    n = len(prompts)
    ticks = sorted(data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n), label="ticks"))
    priorities = data.draw(st.lists(st.integers(-1, 1), min_size=n, max_size=n), label="priorities")
    arrivals = list(zip(ticks, prompts, params, priorities))
    got_async, finished_async, in_flight = _drive(model, arrivals, True, **kw)
    got_sync, finished_sync, none_in_flight = _drive(model, arrivals, False, **kw)
    assert got_async == got_sync
    assert finished_async == finished_sync == len(prompts)
    assert none_in_flight == 0
    if all(sp.is_greedy for sp in params):
        assert in_flight > 0                                   # the async path was taken
    # Greedy and seeded requests do not depend on arrival, priority or batch: the simple loop.
    fixed = [i for i, sp in enumerate(params) if sp.is_greedy or sp.seed is not None]
    if fixed:
        want = generate(model, [prompts[i] for i in fixed], [params[i] for i in fixed])
        assert [got_async[i][0] for i in fixed] == want
        assert [got_async[i][1] for i in fixed] == [_expected_reason(w, params[i], model.eos_token_ids)
                                                    for w, i in zip(want, fixed)]


@settings(max_examples=scaled(60), **SETTINGS)
@given(st.data())
def test_short_requests_and_first_token_stops(data):
    """Prompts of 1 to 3 tokens, max_tokens 1 to 3, and stops on the first sampled id (as a stop
    token or as EOS): the extra row queued behind such an id must leave no trace."""
    prompts = data.draw(st.lists(st.lists(st.integers(0, 258), min_size=1, max_size=3), min_size=1, max_size=10))
    limits = data.draw(st.lists(st.integers(1, 3), min_size=len(prompts), max_size=len(prompts)))
    first = [o[0] for o in generate(_tiny(), prompts, _greedy(1))]
    model = _with_eos(_tiny(), (data.draw(st.sampled_from(first)),))
    params = []
    for f, m in zip(first, limits):
        how = data.draw(st.sampled_from(["stop", "eos", "length"]))
        params.append(_greedy(m, (f,) if how == "stop" else (), ignore_eos=how != "eos"))
    kw = dict(page_size=data.draw(st.sampled_from([1, 2, 4])), swap_space=0,
              max_num_seqs=data.draw(st.sampled_from([1, 2, 256])))
    kw["num_pages"] = _pages_for(prompts, params, kw["page_size"]) + 1 + data.draw(st.integers(0, 4))
    want = [(w, _expected_reason(w, sp, model.eos_token_ids))
            for w, sp in zip(generate(model, prompts, params), params)]
    for flag in (True, False):
        got, _ = _serve(model, prompts, params, async_scheduling=flag, **kw)
        assert_same_greedy(ours(model), prompts, got, want)


def test_stop_ids_in_flight_retire_preempted_requests():
    """A request preempted (swap or recompute) while its in-flight id is a stop token is retired
    from the swapped or waiting queue when the id comes in: it must not run again, and its host
    copy or queue slot must be given back. Tight pools and small pages make this common; the
    sweep runs seeded workloads until both queues have been hit."""
    model, rng = _tiny(), np.random.default_rng(0)
    retired = {"waiting": 0, "swapped": 0}
    for _ in range(400):
        prompts = [rng.integers(0, 256, rng.integers(1, 13)).tolist() for _ in range(rng.integers(2, 5))]
        params = []
        for b in generate(model, prompts, _greedy(10)):
            firsts = [k for k in range(10) if b[k] not in b[:k]]      # stopping there, not earlier
            params.append(_greedy(10, (b[rng.choice(firsts)],)) if rng.random() < 0.7 else _greedy(10))
        page_size = int(rng.choice([1, 2, 4]))
        mode = "swap" if rng.random() < 0.5 else "recompute"
        kw = dict(page_size=page_size, num_pages=_pages_for(prompts, params, page_size) + 1 + int(rng.integers(0, 7)),
                  preemption=mode, swap_space=0.01, max_num_batched_tokens=int(rng.choice([4, 64])))
        want = [(w, _expected_reason(w, sp, ())) for w, sp in zip(generate(model, prompts, params), params)]
        llm = LLM(model, **kw)
        finish = llm.scheduler.finish
        statuses = []
        llm.scheduler.finish = lambda req: (statuses.append(req.status.value), finish(req))[1]
        got = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]
        assert got == want, (prompts, params, kw)
        _check_whole(llm)
        assert statuses.count("finished") == 0      # retired once each
        for s in statuses:
            if s in retired:
                retired[s] += 1
        if min(retired.values()) >= 2:
            break
    assert min(retired.values()) >= 2, retired


@pytest.fixture(scope="module")
def eos_prompts():
    """Prompts whose greedy continuation reaches the model's own EOS id, one on its first token."""
    model = _tiny(2)
    (eos,) = model.eos_token_ids
    rng = np.random.default_rng(0)
    found, first = [], False
    for _ in range(40):
        batch = [rng.integers(0, 259, rng.integers(1, 21)).tolist() for _ in range(50)]
        for p, o in zip(batch, generate(model, batch, _greedy(30))):
            if eos in o:
                found.append(p)
                first |= o[0] == eos
        if len(found) >= 4 and first:
            return model, found
    pytest.fail("no prompt reaches EOS")


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_real_eos_stops_like_the_simple_loop(eos_prompts, mode):
    model, found = eos_prompts
    filler = [[7, 8, 9], list(range(40, 70)), [100] * 12]
    prompts = found + filler
    for ignore_eos in (False, True):
        params = _greedy(30, ignore_eos=ignore_eos)
        want = [(w, _expected_reason(w, params, model.eos_token_ids)) for w in generate(model, prompts, params)]
        if not ignore_eos:
            assert sum(r == "stop" for _, r in want) >= len(found)
        for flag in (True, False):
            got, _ = _serve(model, prompts, [params] * len(prompts), async_scheduling=flag, page_size=8,
                            num_pages=_pages_for(prompts, [params] * len(prompts), 8) + 3, preemption=mode,
                            swap_space=0.01, max_num_batched_tokens=24)
            assert got == want


def test_generate_serves_requests_added_by_hand_and_reuses_the_engine():
    """A generate() call while a hand-added request's step is in flight serves both; a second
    generate() on the same engine (prefix cache warm) gives the same outputs."""
    model = _tiny()
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 256, 24).tolist()
    prompts = [shared + rng.integers(0, 256, int(n)).tolist() for n in rng.integers(1, 20, 6)]
    hand = [rng.integers(0, 256, 9).tolist(), shared + [1, 2, 3]]
    base = generate(model, prompts + hand, _greedy(12))
    params = [_greedy(12, (b[4],)) for b in base[:len(prompts)]]
    hand_params = [_greedy(7), _greedy(12, (base[-1][0],))]
    want = generate(model, prompts, params)
    want_hand = generate(model, hand, hand_params)
    for flag in (True, False):
        llm = LLM(model, async_scheduling=flag, page_size=8, num_pages=24, swap_space=0,
                  enable_prefix_caching=True, max_num_batched_tokens=32)
        reqs = [llm.add_request(p, sp) for p, sp in zip(hand, hand_params)]
        llm.step()
        assert (llm._inflight is not None) == flag
        with pytest.raises(ValueError, match="needs"):       # rejected whole, the step in flight untouched
            llm.generate([[1, 2], list(range(250))], _greedy(4))
        assert (llm._inflight is not None) == flag and len(llm._states) == len(hand)
        first = [o.token_ids for o in llm.generate(prompts, params)]
        assert first == want
        assert [r.token_ids[r.num_prompt_tokens:] for r in reqs] == want_hand
        _check_whole(llm, reqs)
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert llm.prefix_cache.stats().num_hit_tokens > 0
        _check_whole(llm)


def test_pages_written_by_the_extra_row_serve_later_prompts():
    """A request that stops on an id in flight has already computed that id's K/V (the extra row);
    its page, once full, enters the prefix cache. A later prompt that extends the finished
    sequence reads it and must still decode as the simple loop does."""
    model, rng = _tiny(), np.random.default_rng(0)
    more_cached = 0
    for _ in range(12):
        page_size = int(rng.choice([2, 4, 8]))
        prompt = rng.integers(0, 256, int(rng.integers(1, 20))).tolist()
        base = generate(model, [prompt], _greedy(16))[0]
        firsts = [k for k in range(15) if base[k] not in base[:k]]
        aligned = [k for k in firsts if (len(prompt) + k + 1) % page_size == 0]   # the stop id ends a page
        k = (aligned or firsts)[-1]
        first = _greedy(16, (base[k],))
        follow = prompt + base[:k + 1] + rng.integers(0, 256, 5).tolist()
        want = generate(model, [follow], _greedy(8))
        cached = {}
        for flag in (True, False):
            llm = LLM(model, async_scheduling=flag, page_size=page_size, num_pages=64, swap_space=0,
                      enable_prefix_caching=True)
            (a,) = llm.generate([prompt], first)
            assert a.token_ids == base[:k + 1] and a.finish_reason == "stop"
            (b,) = llm.generate([follow], _greedy(8))
            assert [b.token_ids] == want
            _check_whole(llm)
            cached[flag] = b.num_cached_tokens
        more_cached += cached[True] > cached[False]
    assert more_cached > 0          # some later prompt did read the extra row's page


# ---- the decode head through a stand-in for the CUDA graphs ------------------------------------------
class _Graphs:
    """Plays DecodeGraphs on the CPU: runs decode-only heads of up to ``max_seqs`` rows eagerly,
    reading each fed row's id from the previous step's device ids; every ``fail_every``-th run
    reports a failed capture (None), so the engine falls back to the eager forward."""

    def __init__(self, llm: LLM, max_seqs: int, fail_every: int = 0) -> None:
        self.llm, self.max_seqs, self.fail_every = llm, max_seqs, fail_every
        self.runs = self.fed = 0

    def can_run(self, seqs, query_lens) -> bool:
        return 0 < len(seqs) <= self.max_seqs and all(q == 1 for q in query_lens)

    def run(self, tokens, positions, seqs, feed=None, packed=None):
        self.runs += 1
        if self.fail_every and self.runs % self.fail_every == 0:
            return None
        tokens = np.array(tokens, dtype=np.int32)
        if feed is not None:
            rows, src, ids = feed
            tokens[rows] = ids[src]
            self.fed += len(rows)
        batch = pack_batch(list(seqs), [1] * len(seqs), np)
        logits = self.llm.model.forward(tokens, np.asarray(positions), batch, self.llm.pool)
        packed = np.zeros((kernels.NUM_FIELDS, len(seqs)), np.int32) if packed is None else packed
        return logits, kernels.sample(logits, packed)     # the graph draws its rows' ids too


def test_decode_graph_head_reads_every_in_flight_id():
    """One greedy request of 8 tokens: every decode row after the prefill reads its id from the
    step before, through the graph head's feed; none does when ids are synced each step."""
    model = _tiny()
    want = generate(model, [[5, 6, 7, 8]], _greedy(8))
    for flag, fed in ((True, 7), (False, 0)):
        llm = LLM(model, async_scheduling=flag, num_pages=16, swap_space=0)
        llm.graphs = graphs = _Graphs(llm, max_seqs=8)
        (out,) = llm.generate([[5, 6, 7, 8]], _greedy(8))
        assert [out.token_ids] == want
        assert graphs.runs == 7 and graphs.fed == fed


@settings(max_examples=scaled(80), **SETTINGS)
@given(st.data())
def test_decode_graph_head_and_eager_tail_split_the_fed_ids(data):
    """Decode rows replayed by the graph head (when it takes them), the rest eager: ids in flight
    must reach whichever path runs their row, including after a failed capture."""
    model, prompts, params = _greedy_workload(data, max_requests=7, max_len=24, max_out=16)
    kw = _engine_kwargs(data, prompts, params)
    max_seqs = data.draw(st.sampled_from([1, 2, 4, 256]), label="graph_max_seqs")
    fail_every = data.draw(st.sampled_from([0, 2, 3]), label="fail_every")
    want = [(w, _expected_reason(w, sp, model.eos_token_ids))
            for w, sp in zip(generate(model, prompts, params), params)]
    for flag in (True, False):
        llm = LLM(model, async_scheduling=flag, **kw)
        llm.graphs = _Graphs(llm, max_seqs, fail_every)
        outs = llm.generate(prompts, params)
        assert_same_greedy(ours(model), prompts, [(o.token_ids, o.finish_reason) for o in outs], want)
        _check_whole(llm)
