"""The sampling kernels on a GPU at real sizes (128256-token vocabulary): draws against the
reference's kept sets and Gumbel noise, target distributions, batch independence, logprobs."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import run_while_held
from sampling_stats import assert_matches

from pagemem import kernels
from pagemem.kernels.reference_sampling import (gumbel_noise, pack_params, ref_kept_mask, ref_logprobs,
                                                ref_sampling_probs, unpack_params)

pytestmark = pytest.mark.gpu
V = 128256
DTYPES = ["float32", "float16", "bfloat16"]


def _cp():
    import cupy
    return cupy


def _logits(rng, n, dtype, scale=3.0):
    import ml_dtypes
    x = (rng.standard_normal((n, V)) * scale).astype(np.float32)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return x.astype(dt)


SETTINGS = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 50, 0.9, 0.0), (1.0, 0, 0.9, 0.0),
            (0.8, 0, 1.0, 0.05), (1.2, 1000, 0.95, 0.01), (1.0, 5000, 1.0, 0.0), (0.5, 0, 0.999, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_draws_are_the_gumbel_max_of_the_kept_set(rng, dtype):
    """Every path (one pass, gathered in shared memory, radix levels: top-k 5000 and top-p 0.999
    leave more candidates than fit) draws the reference's Gumbel-max token of the kept set,
    except where the two best scores are within float32 rounding of each other."""
    cp = _cp()
    logits = _logits(rng, len(SETTINGS), dtype)
    t, k, p, m = zip(*SETTINGS)
    params = pack_params(t, k, p, m, range(100, 100 + len(SETTINGS)), range(7, 7 + len(SETTINGS)))
    got = kernels.sample(cp.asarray(logits), cp.asarray(params)).get()
    x = logits.astype(np.float32)
    f = unpack_params(params)
    for r, (temp, top_k, top_p, min_p) in enumerate(SETTINGS):
        if temp == 0:
            assert got[r] == x[r].argmax()
            continue
        z = x[r] * np.float32(1 / np.float32(temp))
        keep = ref_kept_mask(z.astype(np.float64), top_k, top_p, min_p)
        assert keep[got[r]], (r, SETTINGS[r])
        score = np.where(keep, gumbel_noise(int(f["seed"][r]), int(f["position"][r]), V) - (z.max() - z), -np.inf)
        best2 = np.sort(score)[-2:]
        if best2[1] - best2[0] > 1e-4:
            assert got[r] == int(np.argmax(score)), (r, SETTINGS[r])


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0, 0.0), (0.7, 5, 0.9, 0.0), (1.5, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2)])
def test_draws_follow_the_target_distribution(setting):
    cp = _cp()
    n = 200_000
    row = np.array([2.0, 1.5, 1.5, 0.3, 0.0, -0.5, -1.0, -3.0] * 8, dtype=np.float32)
    t, k, p, m = setting
    params = pack_params([t] * n, [k] * n, [p] * n, [m] * n, [3] * n, range(n))
    draws = kernels.sample(cp.asarray(np.tile(row, (n, 1))), cp.asarray(params)).get()
    assert_matches(draws, ref_sampling_probs(row[None], params[:, :1])[0])


def test_a_row_draws_the_same_alone_and_in_batches_of_7_and_300(rng):
    cp = _cp()
    logits = _logits(rng, 300, "float32")
    params = pack_params([0.9] * 300, [50] * 300, [0.9] * 300, [0.0] * 300, range(300), range(300))
    full = kernels.sample(cp.asarray(logits), cp.asarray(params)).get()
    seven = kernels.sample(cp.asarray(logits[100:107]), cp.asarray(params[:, 100:107])).get()
    alone = [int(kernels.sample(cp.asarray(logits[i:i + 1]), cp.asarray(params[:, i:i + 1])).get()[0]) for i in (100, 106)]
    assert full[100:107].tolist() == seven.tolist() and [seven[0], seven[6]] == alone
    again = kernels.sample(cp.asarray(logits), cp.asarray(params)).get()
    assert (again == full).all() and len(set(full.tolist())) > 100


@pytest.mark.parametrize("num_top", [0, 1, 20])
def test_logprobs_match_the_reference(rng, num_top):
    cp = _cp()
    logits = _logits(rng, 5, "float32")
    logits[4, 1000:1100] = logits[4].max() + 1          # ties at the top
    params = pack_params([1.0, 0.0, 0.7, 1.3, 1.0], [0] * 5, [1.0] * 5, [0.0] * 5, range(5), range(5))
    tokens = np.array([0, 5, 77, 12345, 1050], np.int32)
    chosen, ids, lps = kernels.sample_logprobs(cp.asarray(logits), cp.asarray(params), cp.asarray(tokens), num_top)
    want = ref_logprobs(logits, params, tokens, num_top)
    np.testing.assert_allclose(chosen.get(), want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ids.get(), want[1])
    np.testing.assert_allclose(lps.get(), want[2], rtol=1e-4, atol=1e-4)


def test_runs_on_the_given_stream(rng):
    """Queued on ``stream`` and only there, without blocking the host: with that stream held by
    a kernel spinning on a host flag, ``out`` copied on another stream still holds its -1 fill
    and the stream's event is not done; released, the ids equal an unheld call's."""
    cp = _cp()
    logits = cp.asarray(_logits(rng, 64, "float32"))
    params = cp.asarray(pack_params([1.0] * 64, [50] * 64, [0.9] * 64, [0.0] * 64, range(64), range(64)))
    want = kernels.sample(logits, params).get()             # also compiles outside the hold
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = cp.full(64, -1, cp.int32)
    stream.synchronize()
    held, seen = run_while_held(cp, stream, lambda: kernels.sample(logits, params, out=out, stream=stream), out)
    assert held, "the host was blocked until the stream drained, or the sampler ran on another stream"
    assert (seen == -1).all(), "out was written while the given stream was held"
    assert (out.get() == want).all()