"""Sampling: validation, greedy, per-request seeds, top-k and top-p sets, stop conditions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagemem.models import SamplingParams
from pagemem.models.sampling import filter_probs, make_rng, sample, stop_reason

LOGITS = np.log(np.asarray([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))   # probs, at temperature 1


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"temperature": -0.1}, ValueError, "temperature"), ({"top_k": -1}, ValueError, "top_k"),
    ({"top_p": 0.0}, ValueError, "top_p"), ({"top_p": 1.5}, ValueError, "top_p"),
    ({"max_tokens": 0}, ValueError, "max_tokens"), ({"top_k": 2.5}, TypeError, "top_k"),
    ({"seed": "1"}, TypeError, "seed"), ({"temperature": None}, TypeError, "temperature"),
])
def test_bad_params_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=f"SamplingParams.{name}"):
        SamplingParams(**kwargs)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    greedy = [SamplingParams(temperature=0.0)] * 4
    np.testing.assert_array_equal(sample(logits, greedy, [make_rng(p) for p in greedy]), logits.argmax(-1))


def test_seed_reproduces_and_is_independent_of_the_batch():
    """A seeded request draws the same tokens alone or beside other requests; another seed differs."""
    logits = np.random.default_rng(1).standard_normal((3, 1000)).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[1:2], [p], [rng])[0] for rng in [make_rng(p)] for _ in range(20)]
    others = [SamplingParams(temperature=0.5, seed=1), p, SamplingParams(temperature=0.0)]
    rngs = [make_rng(q) for q in others]
    batched = [sample(logits, others, rngs)[1] for _ in range(20)]
    assert alone == batched
    q = SamplingParams(temperature=1.0, seed=8)
    rng = make_rng(q)
    assert [sample(logits[1:2], [q], [rng])[0] for _ in range(20)] != alone


def test_top_k_and_top_p_sets():
    """top_k=2 keeps {1, 3}; top_p=0.75 keeps {1, 3, 4} (0.4 + 0.3 < 0.75 <= 0.85)."""
    assert set(np.flatnonzero(filter_probs(LOGITS, SamplingParams(top_k=2)))) == {1, 3}
    p = filter_probs(LOGITS, SamplingParams(top_p=0.75))
    assert set(np.flatnonzero(p)) == {1, 3, 4}
    np.testing.assert_allclose(p[[1, 3, 4]], np.asarray([0.4, 0.3, 0.15]) / 0.85, rtol=1e-6)
    assert set(np.flatnonzero(filter_probs(LOGITS, SamplingParams(top_p=0.4)))) == {1}
    assert set(np.flatnonzero(filter_probs(LOGITS, SamplingParams(top_k=3, top_p=0.5)))) == {1, 3}


def test_draws_stay_in_the_kept_set_with_the_right_frequencies():
    p = SamplingParams(top_k=3, seed=0)
    rng = make_rng(p)
    draws = np.asarray([sample(LOGITS[None], [p], [rng])[0] for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3, 4}
    freq = np.bincount(draws, minlength=5)[[1, 3, 4]] / len(draws)
    np.testing.assert_allclose(freq, np.asarray([0.4, 0.3, 0.15]) / 0.85, atol=0.03)   # ~4 sigma


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(0, 2**31))
def test_filter_probs_properties(top_k, top_p, temperature, seed):
    """Kept probabilities sum to 1, keep the argmax, and hold the top-ranked logits only."""
    logits = np.random.default_rng(seed).standard_normal(40).astype(np.float32)
    probs = filter_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    kept = probs > 0
    assert probs.sum() == pytest.approx(1.0) and kept[logits.argmax()]
    assert kept.sum() <= top_k
    assert logits[kept].min() >= logits[~kept].max(initial=-np.inf)


def test_stop_reason():
    p = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert stop_reason(p, 5, 1, eos_token_ids=(2,)) is None
    assert stop_reason(p, 9, 1, eos_token_ids=(2,)) == "stop"
    assert stop_reason(p, 2, 1, eos_token_ids=(2,)) == "stop"
    assert stop_reason(SamplingParams(ignore_eos=True), 2, 1, eos_token_ids=(2,)) is None
    assert stop_reason(p, 5, 3, eos_token_ids=(2,)) == "length"
