"""The engine's boundary: LLM's and load_model's arguments, generate()'s and add_request()'s
inputs, the default pool sizes, the eviction policy, and the deadlock guard. A refused call
raises TypeError/ValueError naming the argument and changes nothing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pagemem import PagePool
from pagemem.eviction import FIFO, LRU, Priority
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models import engine
from pagemem.models.engine import CPU_POOL_BYTES, LLM, default_pool_config
from pagemem.scheduler import ScheduledStep

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TINY_PAGE_BYTES = 2 * 2 * 16 * 2 * 16 * 4     # random:tiny, page_size 16, float32 (see test_cli.py)


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny", device="cpu", seed=3)


def _state(llm: LLM):
    """What a refused call must leave as it was."""
    s = llm.scheduler
    return (llm._next_id, len(llm._states), len(s.waiting), len(s.running), len(s.swapped),
            llm.pool.num_free_pages, llm._inflight)


# ---- LLM(...) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(swap_space=float("inf")), ValueError, "swap_space must be a finite number of GiB >= 0, got inf"),
    (dict(swap_space=float("nan")), ValueError, "swap_space must be a finite number of GiB >= 0, got nan"),
    (dict(swap_space=-1), ValueError, "swap_space must be a finite"),
    (dict(swap_space=1e12), ValueError, "swap_space 1e\\+12 GiB is more than this machine's"),
    (dict(swap_space="1"), TypeError, "swap_space must be a number"),
    (dict(swap_space=True), TypeError, "swap_space must be a number"),
    (dict(num_pages=1), ValueError, "num_pages must be >= 2"),
    (dict(num_pages=2.0), TypeError, "num_pages must be an int"),
    (dict(num_pages=2**50), ValueError, "num_pages 1125899906842624: a pool of .* is more than this machine's"),
    (dict(gpu_memory_utilization=0), ValueError, "gpu_memory_utilization must be in \\(0, 1\\]"),
    (dict(gpu_memory_utilization=float("nan")), ValueError, "gpu_memory_utilization"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1"),
    (dict(max_num_batched_tokens="8"), TypeError, "max_num_batched_tokens must be an int"),
    (dict(admit_batch=0), ValueError, "admit_batch must be >= 1"),
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(seed=2**64), ValueError, "seed must be <="),
    (dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(watermark=1.0), ValueError, "watermark must be in \\[0, 1\\)"),
    (dict(watermark=float("nan")), ValueError, "watermark"),
    (dict(watermark="0"), TypeError, "watermark must be a number"),
    (dict(preemption="swapp"), ValueError, "preemption must be one of"),
    (dict(preemption=None), ValueError, "preemption must be one of"),
    (dict(preemption="auto", swap_space=0), ValueError, "preemption='auto' needs swap_space > 0"),
    (dict(eviction="mru"), ValueError, "eviction must be one of"),
    (dict(eviction=LRU), TypeError, "eviction must be a policy instance or name"),
    (dict(enable_prefix_caching="yes"), TypeError, "enable_prefix_caching must be a bool"),
    (dict(async_scheduling=1), TypeError, "async_scheduling must be a bool"),
    (dict(cuda_graph=None), TypeError, "cuda_graph must be a bool"),
    (dict(dtype="int8"), ValueError, "dtype must be one of"),
    (dict(dtype="float16"), ValueError, "differ from the given Model's \\(float32 on cpu\\)"),
    (dict(device="tpu"), ValueError, "device must be one of"),
])
def test_llm_arguments_are_checked_and_named(tiny, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LLM(tiny, **{"swap_space": 0.01, "num_pages": 16, **kwargs})


def test_llm_checks_its_arguments_before_loading_the_model(monkeypatch):
    """A bad argument is reported at once, before any weights are read or drawn."""
    def no_loading(*args, **kwargs):
        raise AssertionError("load_model called")
    monkeypatch.setattr(engine, "load_model", no_loading)
    with pytest.raises(ValueError, match="swap_space"):
        LLM("random:llama-3-8b", swap_space=float("inf"))
    with pytest.raises(TypeError, match="model must be a path, 'random:<preset>' or a Model, got int 3"):
        LLM(3)
    with pytest.raises(TypeError, match="model must be"):
        LLM(b"random:tiny")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(path_or_random=None), TypeError, "model must be a path"),
    (dict(path_or_random=b"random:tiny"), TypeError, "model must be a path"),
    (dict(path_or_random="random:tiny", seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(path_or_random="random:tiny", seed="0"), TypeError, "seed must be an int"),
    (dict(path_or_random="random:tiny", dtype=3), TypeError, "dtype must be one of"),
    (dict(path_or_random="random:tiny", device=0), TypeError, "device must be a str"),
    (dict(path_or_random="random:"), ValueError, "unknown preset ''"),
    (dict(path_or_random="/no/such/folder"), FileNotFoundError, "model '/no/such/folder' is not a folder, nor"),
])
def test_load_model_arguments(kwargs, exc, match):
    """Named as the user wrote them ('model', not path_or_random; seed -1 not NumPy's
    'expected non-negative integer')."""
    with pytest.raises(exc, match=match):
        load_model(**{"device": "cpu", **kwargs})


def test_bfloat16_is_refused_on_the_cpu_up_front():
    """NumPy has no bfloat16 arithmetic (its matmul returns float32): refused at load, with why,
    instead of a forward that fails on its first norm."""
    for make in (lambda: load_model("random:tiny", dtype="bfloat16", device="cpu"),
                 lambda: LLM("random:tiny", dtype="bfloat16", device="cpu", num_pages=8, swap_space=0)):
        with pytest.raises(ValueError, match="dtype bfloat16 runs on CUDA only: NumPy has no bfloat16 arithmetic"):
            make()
    assert load_model("random:tiny", dtype="float16", device="cpu").dtype == np.float16


# ---- the pool LLM builds ----------------------------------------------------------------------------
def test_default_pool_on_the_cpu_is_one_gib(tiny):
    llm = LLM(tiny, swap_space=0)
    assert llm.pool.config.page_bytes == TINY_PAGE_BYTES
    assert llm.pool.num_pages == 2**30 // TINY_PAGE_BYTES == CPU_POOL_BYTES // TINY_PAGE_BYTES
    small = LLM(tiny, swap_space=0, page_size=4)
    assert small.pool.num_pages == 2**30 // (TINY_PAGE_BYTES // 4)


def test_default_pool_on_cuda_takes_its_share_of_free_memory(tiny, monkeypatch):
    """PoolConfig.from_memory's CUDA branch as LLM reaches it (default_pool_config), with stand-ins
    for the device and its free-memory probe: utilization x free bytes, in whole pages."""
    import pagemem.config as pconfig
    free = 10 * 2**30 + 12345
    monkeypatch.setattr(pconfig, "free_device_memory", lambda: (free, 80 * 2**30))
    monkeypatch.setattr(pconfig, "resolve_device", lambda device: "cuda")
    on_cuda = dataclasses.replace(tiny, device="cuda")
    for utilization in (0.5, 0.05, 1.0):
        config = default_pool_config(on_cuda, None, 16, utilization)
        assert config.num_pages == int(free * utilization) // TINY_PAGE_BYTES and config.device == "cuda"
    assert default_pool_config(on_cuda, 9, 16, 0.5).num_pages == 9        # num_pages wins


def test_llm_hands_its_sizing_arguments_to_the_pool(tiny, monkeypatch):
    seen = []
    real = engine.default_pool_config
    monkeypatch.setattr(engine, "default_pool_config", lambda *a: seen.append(a[1:]) or real(*a))
    LLM(tiny, gpu_memory_utilization=0.3, page_size=8, swap_space=0)
    LLM(tiny, num_pages=20, page_size=4, swap_space=0)
    assert seen == [(None, 8, 0.3), (20, 4, 0.9)]


@pytest.mark.parametrize("eviction, policy", [("lru", LRU), ("fifo", FIFO), ("priority", Priority), ("FIFO", FIFO)])
def test_eviction_reaches_the_pool(tiny, eviction, policy):
    """The policy named is the pool's, and a prefix-cached run under pressure evicts through it
    and still gives the simple loop's tokens."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, 24).tolist() for _ in range(6)]
    llm = LLM(tiny, num_pages=12, page_size=4, swap_space=0, enable_prefix_caching=True, eviction=eviction,
              max_num_seqs=2)
    assert type(llm.pool.policy) is policy
    calls = []
    pop = llm.pool.policy.pop_victim
    llm.pool.policy.pop_victim = lambda *a, **k: calls.append(1) or pop(*a, **k)
    outs = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert outs == generate(tiny, prompts, GREEDY)
    assert llm.pool.num_evictions > 0 and len(calls) >= llm.pool.num_evictions
    own = FIFO()
    assert LLM(tiny, num_pages=8, swap_space=0, eviction=own).pool.policy is own


# ---- generate() / add_request() ------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, match", [
    (lambda llm: llm.generate(None), TypeError, "prompts must be a str or a list of str / token-id lists, got NoneType"),
    (lambda llm: llm.generate(b"hi"), TypeError, "prompts must be .* got bytes"),
    (lambda llm: llm.generate([]), ValueError, "prompts is empty"),
    (lambda llm: llm.generate([[1, 2]], []), ValueError, "params: 0 SamplingParams for 1 prompts"),
    (lambda llm: llm.generate([[1, 2], [3]], [GREEDY]), ValueError, "params: 1 SamplingParams for 2 prompts"),
    (lambda llm: llm.generate([[1, 2]], {"temperature": 0}), TypeError, "params must be SamplingParams or a list"),
    (lambda llm: llm.generate([[1, 2]], [None]), TypeError, "params must hold SamplingParams, got NoneType"),
    (lambda llm: llm.generate([[1, 2]], GREEDY, use_tqdm="no"), TypeError, "use_tqdm must be a bool"),
    (lambda llm: llm.generate([[1, 2.0]]), TypeError, "prompt token ids must be ints, got 2.0"),
    (lambda llm: llm.generate([[1, True]]), TypeError, "prompt token ids must be ints, got True"),
    (lambda llm: llm.generate([["1"]]), TypeError, "prompt token ids must be ints, got '1'"),
    (lambda llm: llm.generate([[[1]]]), TypeError, "prompt token ids must be ints, got \\[1\\]"),
    (lambda llm: llm.generate([5]), TypeError, "a prompt must be a str or a sequence of token ids, got int"),
    (lambda llm: llm.generate([[]]), ValueError, "prompt is empty"),
    (lambda llm: llm.generate([[-1]]), ValueError, "prompt token ids must be in \\[0, 259\\)"),
    (lambda llm: llm.generate([[259]]), ValueError, "prompt token ids must be in \\[0, 259\\)"),
    (lambda llm: llm.generate([[1] * 4090], SamplingParams(max_tokens=7)), ValueError,
     "prompt of 4090 tokens \\+ max_tokens=7 exceeds the model's context of 4096 tokens"),
    (lambda llm: llm.generate([[1] * 200]), ValueError, "needs 14 pages .* the pool has 7"),
    (lambda llm: llm.add_request([1], "greedy"), TypeError, "params must be SamplingParams, got str"),
    (lambda llm: llm.add_request([1], GREEDY, priority=1.5), TypeError, "priority must be an int"),
])
def test_refused_inputs_are_named_and_change_nothing(tiny, call, exc, match):
    """Every refusal of generate()/add_request() names what was wrong; valid prompts of the same
    call are not queued, and the engine then serves as a fresh one does."""
    llm = LLM(tiny, num_pages=8, page_size=16, swap_space=0)
    before = _state(llm)
    with pytest.raises(exc, match=match):
        call(llm)
    assert _state(llm) == before
    assert [o.token_ids for o in llm.generate([[1, 2, 3]], GREEDY)] == generate(tiny, [[1, 2, 3]], GREEDY)


class _FailingOnce:
    """A model whose first forward raises; the rest is the wrapped model's."""

    def __init__(self, model) -> None:
        self._model, self.failed = model, False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise ValueError("planted")
        return self._model.forward(*args, **kwargs)


def test_a_failing_step_leaves_the_engine_usable(tiny):
    """A step that raises (here a forward that fails once) aborts the call's requests; the next
    call is served as by a fresh engine and the pool is whole."""
    llm = LLM(tiny, num_pages=16, page_size=4, swap_space=0)
    llm.model = _FailingOnce(tiny)
    with pytest.raises(ValueError, match="planted"):
        llm.generate([[1, 2, 3], [4, 5]], GREEDY)
    assert not llm.has_unfinished() and not llm._states and llm.pool.stats().num_used == 0
    llm.pool.check_integrity()
    assert [o.token_ids for o in llm.generate([[1, 2, 3]], GREEDY)] == generate(tiny, [[1, 2, 3]], GREEDY)


def test_the_deadlock_guard_names_the_pool_and_queues(tiny):
    """A schedule that runs nothing while requests wait, with nothing in flight, is an internal
    error: RuntimeError with the numbers, not an endless loop."""
    llm = LLM(tiny, num_pages=8, page_size=4, swap_space=0)
    llm.add_request([1, 2, 3], GREEDY)
    schedule = llm.scheduler.schedule
    llm.scheduler.schedule = lambda: ScheduledStep([], [], [], [])
    with pytest.raises(RuntimeError, match="no request could be scheduled: 7 free pages, 1 waiting, 0 swapped"):
        llm.step()
    llm.scheduler.schedule = schedule
    while llm.has_unfinished():
        llm.step()
    assert isinstance(llm.pool, PagePool) and llm.pool.stats().num_used == 0
