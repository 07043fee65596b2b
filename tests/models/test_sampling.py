"""SamplingParams validation, stop conditions, and sampling through the engine: reproducible
seeded draws whatever the batch, the target distribution end to end, log-probabilities."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis_budget import scaled

from _helpers import prefill_logits
from sampling_stats import assert_matches

from pagemem.kernels.reference_sampling import ref_kept_mask, ref_logprobs, ref_sampling_probs, unpack_params
from pagemem.models import LLM, SamplingParams, load_model
from pagemem.models.sampling import pack_rows, request_seed, stop_reason


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"temperature": -0.1}, ValueError, "temperature"), ({"top_k": -1}, ValueError, "top_k"),
    ({"top_p": 0.0}, ValueError, "top_p"), ({"top_p": 1.5}, ValueError, "top_p"),
    ({"max_tokens": 0}, ValueError, "max_tokens"), ({"top_k": 2.5}, TypeError, "top_k"),
    ({"seed": "1"}, TypeError, "seed"), ({"temperature": None}, TypeError, "temperature"),
    ({"seed": -1}, ValueError, "seed"), ({"seed": 2**64}, ValueError, "seed"),
    ({"temperature": float("nan")}, ValueError, "temperature"), ({"top_p": float("inf")}, ValueError, "top_p"),
    ({"temperature": True}, TypeError, "temperature"), ({"min_p": 1.0}, ValueError, "min_p"),
    ({"min_p": -0.1}, ValueError, "min_p"), ({"logprobs": 21}, ValueError, "logprobs"),
    ({"logprobs": -1}, ValueError, "logprobs"), ({"logprobs": 2.0}, TypeError, "logprobs"),
    ({"stop_token_ids": "123"}, TypeError, "stop_token_ids"), ({"stop_token_ids": [1.7]}, TypeError, "stop_token_ids"),
    ({"stop_token_ids": [-3]}, ValueError, "stop_token_ids"), ({"stop_token_ids": 5}, TypeError, "stop_token_ids"),
    ({"ignore_eos": "no"}, TypeError, "ignore_eos"), ({"max_tokens": True}, TypeError, "max_tokens"),
])
def test_bad_params_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=f"SamplingParams.{name}"):
        SamplingParams(**kwargs)


def test_good_params_are_kept_as_given():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=2**64 - 1, stop_token_ids=[4, np.int32(5)],
                       min_p=0.1, logprobs=20)
    assert p.stop_token_ids == (4, 5) and p.seed == 2**64 - 1 and not p.is_greedy
    assert SamplingParams(temperature=0.0).is_greedy and SamplingParams(top_k=1).is_greedy


def test_stop_reason():
    p = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert stop_reason(p, 5, 1, eos_token_ids=(2,)) is None
    assert stop_reason(p, 9, 1, eos_token_ids=(2,)) == "stop"
    assert stop_reason(p, 2, 1, eos_token_ids=(2,)) == "stop"
    assert stop_reason(SamplingParams(ignore_eos=True), 2, 1, eos_token_ids=(2,)) is None
    assert stop_reason(p, 5, 3, eos_token_ids=(2,)) == "length"


def test_pack_rows_carries_each_setting():
    params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05), SamplingParams(temperature=0.0)]
    f = unpack_params(pack_rows(params, [123, 2**63], [17, 4]))
    assert f["temperature"].tolist() == [np.float32(0.7), 0.0] and f["top_k"].tolist() == [50, 0]
    assert f["top_p"].tolist() == [np.float32(0.9), 1.0] and f["min_p"].tolist() == [np.float32(0.05), 0.0]
    assert f["seed"].tolist() == [123, 2**63] and f["position"].tolist() == [17, 4]


def test_request_seed_is_the_given_one_or_a_mix_of_engine_seed_and_id():
    assert request_seed(SamplingParams(seed=5), 0, 9) == 5
    mixed = {request_seed(SamplingParams(), s, i) for s in range(3) for i in range(100)}
    assert len(mixed) == 300 and all(0 <= x < 2**64 for x in mixed)


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny", device="cpu")


SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, max_tokens=6, ignore_eos=True)


def test_seeded_request_draws_the_same_alone_and_in_batches_of_7_and_300(tiny):
    """A seeded request's tokens depend only on its seed and positions: alone, among 6 others
    and among 299 others (mixed settings, chunked prefill, the request itself preempted by swap
    and by recompute: pools of 4-token pages too small to hold the batch), and on a second run."""
    prompt = [11, 22, 33, 44, 55]
    rng = np.random.default_rng(0)
    others = [(rng.integers(0, 250, rng.integers(1, 12)).tolist(),
               SamplingParams(temperature=float(rng.uniform(0.3, 1.5)), top_p=float(rng.uniform(0.5, 1.0)),
                              top_k=int(rng.integers(0, 30)), max_tokens=int(rng.integers(1, 8)), ignore_eos=True))
              for _ in range(299)]
    alone = LLM(tiny, num_pages=64).generate([prompt], SAMPLED)[0].token_ids
    assert len(set(alone)) > 1                               # really sampled, not a fixed point
    for (batch, num_pages), mode in itertools.product(((others[:6], 12), (others, 10)), ("swap", "recompute")):
        llm = LLM(tiny, num_pages=num_pages, page_size=4, max_num_batched_tokens=64, preemption=mode, seed=5)
        mid = len(batch) // 2
        prompts = [p for p, _ in batch[:mid]] + [prompt] + [p for p, _ in batch[mid:]]
        params = [sp for _, sp in batch[:mid]] + [SAMPLED] + [sp for _, sp in batch[mid:]]
        outs = llm.generate(prompts, params)
        assert outs[mid].num_preemptions > 0 and llm.scheduler.num_preemptions[mode] > 0, (len(batch), mode)
        assert outs[mid].token_ids == alone, (len(batch), mode)
    again = LLM(tiny, num_pages=64).generate([prompt], SAMPLED)[0].token_ids
    assert again == alone


def test_unseeded_requests_draw_from_the_engine_seed(tiny):
    p = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [[o.token_ids for o in LLM(tiny, num_pages=64, seed=s).generate([[1, 2, 3]] * 3, p)] for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len({tuple(t) for t in runs[0]}) > 1               # requests of one call differ (their ids)


def test_engine_draws_follow_the_model_distribution(tiny):
    """The first sampled token of many identical requests (distinct seeds) follows the target
    distribution the reference gives for the model's logits of that prompt (chi-square)."""
    prompt = [5, 6, 7]
    logits = prefill_logits(tiny, [prompt])[0][-1]
    probs = ref_sampling_probs(logits[None], pack_rows([SamplingParams(temperature=1.5, top_k=12)], [0], [3]))[0]
    outs = LLM(tiny, num_pages=256, max_num_seqs=256).generate(
        [prompt] * 3000, [SamplingParams(temperature=1.5, top_k=12, max_tokens=1, seed=s) for s in range(3000)])
    assert_matches(np.asarray([o.token_ids[0] for o in outs]), probs)


def test_logprobs_through_the_engine(tiny):
    """Each generated token carries its log-probability and the top N of its position, which
    equal the reference's on the model's logits; greedy tokens are the most likely."""
    out = LLM(tiny, num_pages=64).generate([[9, 8, 7]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4 and [t.token_id for t in out.logprobs] == out.token_ids
    for t in out.logprobs:
        assert len(t.top) == 3 and t.top[0][0] == t.token_id and t.top[0][1] == pytest.approx(t.logprob)
    logits = prefill_logits(tiny, [[9, 8, 7]])[0][-1]
    params = pack_rows([SamplingParams(temperature=0.0)], [0], [3])
    chosen, ids, lps = ref_logprobs(logits[None], params, np.array([out.token_ids[0]], np.int32), 3)
    assert [i for i, _ in out.logprobs[0].top] == ids[0].tolist()
    np.testing.assert_allclose([v for _, v in out.logprobs[0].top], lps[0], rtol=1e-5, atol=1e-6)
    sampled = LLM(tiny, num_pages=64).generate([[9, 8, 7]], SamplingParams(temperature=0.8, top_k=5, seed=3,
                                                                           max_tokens=3, logprobs=0))[0]
    assert all(t.top == () and t.logprob < 0 for t in sampled.logprobs)
    assert LLM(tiny, num_pages=64).generate([[1]], SamplingParams(max_tokens=2))[0].logprobs is None


@settings(max_examples=scaled(25), deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 1.0), st.floats(0.0, 0.5), st.integers(0, 2**31))
def test_kept_set_properties(top_k, top_p, min_p, seed):
    """The kept set holds the argmax, at most top_k tokens unless tied, and is a top slice."""
    z = np.random.default_rng(seed).standard_normal(40)
    kept = ref_kept_mask(z, top_k, top_p, min_p)
    assert kept[z.argmax()]
    assert kept.sum() <= top_k or np.sort(z)[::-1][top_k - 1] == np.sort(z)[::-1][min(top_k, 39)]
    assert z[kept].min() >= z[~kept].max(initial=-np.inf)
    # The same set counted by hand, token by token from the top (no ties in these draws): the k
    # largest, those within min_p of the top, and of them the fewest whose mass reaches top_p.
    order = np.argsort(-z)
    cand = [i for n, i in enumerate(order) if (top_k == 0 or n < top_k) and z[i] >= z.max() + np.log(min_p or 1e-300)]
    mass = np.exp(z[cand] - z.max())
    want, acc = [], 0.0
    for i, m in zip(cand, mass):
        if top_p < 1 and acc >= top_p * mass.sum():
            break
        want.append(i)
        acc += m
    assert sorted(np.flatnonzero(kept).tolist()) == sorted(want)
