"""The engine on a GPU: CUDA-graph decode, swap on real streams and recompute give the same greedy
tokens as a plain eager run with a pool big enough (float32, so that batch composition, which
changes cuBLAS and split-K reduction order, cannot flip a near-tie)."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.engine import LLM

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def setup():
    model = load_model("random:tiny", dtype="float32", device="cuda", seed=5)
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 256, 48).tolist()
    prompts = [(shared if i % 3 == 0 else []) + rng.integers(0, 256, rng.integers(4, 90)).tolist()
               for i in range(24)]
    reference = [o.token_ids for o in LLM(model, num_pages=1024, swap_space=0, cuda_graph=False)
                 .generate(prompts, GREEDY)]
    return model, prompts, reference


def test_simple_loop_matches_eager_engine(setup):
    model, prompts, reference = setup
    assert generate(model, prompts, GREEDY) == reference


@pytest.mark.parametrize("kw", [
    dict(num_pages=1024, swap_space=0),                                       # CUDA graphs
    dict(num_pages=1024, swap_space=0, async_scheduling=False),               # ids synced each step
    dict(num_pages=24, preemption="swap", swap_space=0.05),                   # ~4x oversubscribed
    dict(num_pages=24, preemption="recompute", swap_space=0),
    dict(num_pages=24, preemption="auto", swap_space=0.05),
    dict(num_pages=64, preemption="swap", swap_space=0.05, enable_prefix_caching=True),
], ids=["graphs", "graphs-sync", "swap", "recompute", "auto", "swap+prefix"])
def test_greedy_tokens_identical(setup, kw):
    model, prompts, reference = setup
    llm = LLM(model, max_num_batched_tokens=256, **kw)
    outs = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert outs == reference
    assert llm.graphs.num_replays > 0 and llm.graphs.disabled is None
    llm.pool.check_integrity()
    if kw.get("preemption") == "swap":
        assert llm.swap.num_pages_out > 0


def test_warmup_compiles_then_serves_the_same_tokens(setup):
    """warmup() runs throwaway prompts and captures the decode graphs; the pool is whole again
    and the next generate() gives the reference tokens."""
    model, prompts, reference = setup
    llm = LLM(model, num_pages=1024, swap_space=0, max_num_batched_tokens=256)
    llm.warmup(200)
    assert llm.graphs.num_captures > 0 and llm.pool.stats().num_used == 0
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("w_layout", ["C", "F"])
def test_capturable_gemm_matches_cupy(dtype, w_layout):
    import cupy as cp
    from pagemem.models.cublas_graph import CapturableGemm
    stream = cp.cuda.Stream(non_blocking=True)
    gemm = CapturableGemm(stream)
    x = cp.random.standard_normal((37, 96), dtype=cp.float32).astype(dtype)
    w = cp.random.standard_normal((130, 96), dtype=cp.float32).astype(dtype)
    if w_layout == "F":
        w = cp.asfortranarray(w)
    with stream:
        y = gemm(x, w)
        ref = x.astype(cp.float32) @ w.astype(cp.float32).T
    stream.synchronize()
    tol = 2e-2 if dtype == "float16" else 1e-4      # fp16 output rounding over 96-term sums
    cp.testing.assert_allclose(y.astype(cp.float32), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [dict(num_pages=1024, swap_space=0),
                                dict(num_pages=24, preemption="swap", swap_space=0.05)], ids=["graphs", "swap"])
def test_stop_tokens_with_ids_fed_on_the_device(setup, kw):
    """Requests ending on a stop token sampled while the next step was already queued (its ids
    fed to the graph on the device) end where the simple loop ends them; their pages come back."""
    model, prompts, reference = setup
    counts = {}
    for out in reference:
        for t in set(out[3:30]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=(stop,))
    want = generate(model, prompts, params)
    assert any(len(w) < 40 for w in want)
    llm = LLM(model, max_num_batched_tokens=256, **kw)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.graphs.num_replays > 0 and not llm.has_unfinished()
    llm.pool.check_integrity()
    assert llm.pool.stats().num_used == 0


SAMPLED = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_tokens=40, ignore_eos=True, seed=s)
           if s % 2 else SamplingParams(temperature=1.0, min_p=0.02, max_tokens=40, ignore_eos=True) for s in range(24)]


@pytest.mark.parametrize("kw", [
    dict(num_pages=1024, swap_space=0),
    dict(num_pages=1024, swap_space=0, async_scheduling=False),
    dict(num_pages=24, preemption="swap", swap_space=0.05),
    dict(num_pages=24, preemption="recompute", swap_space=0),
], ids=["graphs", "graphs-sync", "swap", "recompute"])
def test_sampled_tokens_identical(setup, kw):
    """Sampling draws on the device, inside the decode graphs, with ids kept on the device by async
    scheduling: every path gives the tokens of a plain eager run, since a draw depends only on the
    request's seed (given, or the engine's and its id) and the token's position."""
    model, prompts, _ = setup
    want = [o.token_ids for o in LLM(model, num_pages=1024, swap_space=0, cuda_graph=False, async_scheduling=False)
            .generate(prompts, SAMPLED)]
    assert len({t for w in want for t in w}) > 50             # really sampled
    llm = LLM(model, max_num_batched_tokens=256, **kw)
    assert [o.token_ids for o in llm.generate(prompts, SAMPLED)] == want
    assert llm.graphs.num_replays > 0 and llm.graphs.disabled is None
    llm.pool.check_integrity()
