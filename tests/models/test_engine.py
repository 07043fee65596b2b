"""LLM engine: greedy outputs do not depend on how the pool was managed (preemption mode, pool
size, prefix caching), and match the simple prefill-then-decode loop."""
from __future__ import annotations

import numpy as np
import pytest

from models import SamplingParams, generate, load_model
from models.engine import LLM

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


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_oversubscribed_pool_gives_identical_outputs(tiny, prompts, reference, mode):
    """About 65 pages of demand (12 requests of 4 to 8 pages) on a pool of 16: 4x oversubscribed."""
    outs, llm = run(tiny, prompts, num_pages=17, page_size=8 * 2, preemption=mode, swap_space=0.01,
                    max_num_batched_tokens=64)
    assert outs == reference
    assert sum(llm.scheduler.num_preemptions.values()) > 0
    if mode == "swap":
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
