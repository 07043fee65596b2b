"""Traces: JSONL files, the length distributions' statistics, Poisson arrivals, prefix groups."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pagemem.traces import (DATASETS, MAX_OUTPUT_LEN, MAX_PROMPT_LEN, PromptSource, TraceRequest, load_trace,
                            lognormal_lengths, poisson_arrivals, save_trace, synthetic_trace)


def test_save_and_load_round_trip_every_field(tmp_path):
    trace = [TraceRequest(0.0, 5, 3), TraceRequest(0.5, 9, 1, prefix_group=0, prefix_len=4),
             TraceRequest(0.5, 7, 2, prefix_group=3, prefix_len=7, priority=-2)]
    path = tmp_path / "t.jsonl"
    save_trace(path, trace)
    assert load_trace(path) == trace
    first, second = path.read_text().splitlines()[:2]
    assert json.loads(first) == {"arrival_s": 0.0, "prompt_len": 5, "output_len": 3}   # optional fields left out
    assert json.loads(second)["prefix_group"] == 0                                      # group 0 kept


@pytest.mark.parametrize("line, message", [
    ('{"arrival_s": 0, "prompt_len": 0, "output_len": 2}', "prompt_len must be >= 1"),
    ('{"arrival_s": -1, "prompt_len": 3, "output_len": 2}', "arrival_s"),
    ('{"arrival_s": 0, "prompt_len": 3}', "missing fields ['output_len']"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2, "color": 1}', "unknown fields ['color']"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2, "prefix_len": 2}', "needs a prefix_group"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2, "prefix_group": 1, "prefix_len": 4}', "prefix_len"),
    ('{"arrival_s": 0, "prompt_len": 3.5, "output_len": 2}', "prompt_len must be an int"),
    ('[1, 2]', "expected an object"),
    ('{"arrival_s": 0,', "not JSON"),
])
def test_a_bad_line_is_named_by_its_number(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 4, "output_len": 2}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:3: .*{message[:20]}".replace("[", r"\[").replace("]", r"\]")):
        load_trace(path)


def test_arrivals_must_not_go_back_and_a_trace_is_not_empty(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 2, "prompt_len": 4, "output_len": 2}\n{"arrival_s": 1, "prompt_len": 4, "output_len": 2}\n')
    with pytest.raises(ValueError, match="arrival order"):
        load_trace(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_trace(path)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_lengths_have_the_papers_means_within_their_caps(dataset):
    """200,000 draws: each mean within 1.5% of Kwon et al.'s figure (the sampling error of a
    lognormal of sigma 1 at this size is about 0.3%), every length in [1, cap]."""
    stats = DATASETS[dataset]
    rng = np.random.default_rng(1)
    for mean, sigma, cap in ((stats.mean_prompt, stats.sigma_prompt, MAX_PROMPT_LEN),
                             (stats.mean_output, stats.sigma_output, MAX_OUTPUT_LEN)):
        x = lognormal_lengths(rng, 200_000, mean, sigma, cap)
        assert x.dtype == np.int64 and x.min() >= 1 and x.max() <= cap
        assert abs(x.mean() / mean - 1) < 0.015, (dataset, mean, x.mean())
        assert np.median(x) < mean            # right-skewed: most requests are shorter than the mean


def test_sharegpt_against_alpaca_as_the_paper_compares_them():
    """ShareGPT's prompts about 8.4x and outputs about 5.8x Alpaca's, with a wider spread."""
    share, alp = synthetic_trace(50_000, "sharegpt", seed=2), synthetic_trace(50_000, "alpaca", seed=2)
    p = [np.array([r.prompt_len for r in t]) for t in (share, alp)]
    o = [np.array([r.output_len for r in t]) for t in (share, alp)]
    assert 7.9 < p[0].mean() / p[1].mean() < 8.9 and 5.4 < o[0].mean() / o[1].mean() < 6.2
    assert p[0].std() / p[0].mean() > p[1].std() / p[1].mean()


def test_the_clipped_mean_solve_is_needed_and_right():
    """Without solving mu for the cap, a lognormal of ShareGPT's output mean clipped at 1024 would
    fall short of 338 by several percent: the solved one does not."""
    rng = np.random.default_rng(3)
    naive = np.clip(rng.lognormal(math.log(338.0) - 0.5, 1.0, 200_000), 1, 1024).mean()
    assert naive < 0.97 * 338
    assert abs(lognormal_lengths(rng, 200_000, 338.0, 1.0, 1024).mean() / 338 - 1) < 0.015


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    t = poisson_arrivals(np.random.default_rng(4), 100_000, rate=50.0)
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * 50 - 1) < 0.02                 # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - 1) < 0.02         # exponential: std equals mean
    assert (poisson_arrivals(np.random.default_rng(0), 5, math.inf) == 0).all()
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(np.random.default_rng(0), 5, 0.0)


def test_prefix_mix_puts_a_shared_prefix_before_a_share_of_prompts():
    plain = synthetic_trace(20_000, "alpaca", seed=5)
    mixed = synthetic_trace(20_000, "alpaca", seed=5, prefix_share=0.25, num_prefix_groups=3, prefix_len=40)
    grouped = [r for r in mixed if r.prefix_group is not None]
    assert abs(len(grouped) / len(mixed) - 0.25) < 0.02
    assert {r.prefix_group for r in grouped} == {0, 1, 2} and all(r.prefix_len == 40 for r in grouped)
    for a, b in zip(plain, mixed):       # the same draws, the prefix put before the grouped ones
        assert b.prompt_len == a.prompt_len + (40 if b.prefix_group is not None else 0)
    with pytest.raises(ValueError, match="prefix_share"):
        synthetic_trace(5, prefix_share=1.5)
    with pytest.raises(ValueError, match="dataset"):
        synthetic_trace(5, "lmsys")


def test_prompt_source_shares_group_prefixes_whatever_the_order_and_nothing_else():
    short, long = TraceRequest(0, 30, 1, 7, 20), TraceRequest(0, 700, 1, 7, 600)
    a, b = PromptSource(100, seed=1), PromptSource(100, seed=1)
    a_short, a_long = a(short), a(long)
    b_long, b_short = b(long), b(short)          # asked in the other order
    assert a_long[:600] == b_long[:600] and a_short[:20] == b_short[:20] == a_long[:20]
    assert len(a_short) == 30 and len(a_long) == 700 and all(0 <= t < 100 for t in a_long)
    other = a(TraceRequest(0, 30, 1, 8, 20))
    assert other[:20] != a_short[:20]                                   # another group, another prefix
    plain = [a(TraceRequest(0, 16, 1)) for _ in range(3)]
    assert len({tuple(p) for p in plain}) == 3                          # own tokens differ
    assert PromptSource(100, seed=2)(short) != PromptSource(100, seed=1)(short)
