"""Token sampling: the NumPy reference against its definition and target distributions, and the
CUDA kernel (through the simulator at tiny sizes) against the reference's kept sets, its Gumbel
noise and its log-probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import kernels
from pagemem.kernels._device import SIM
from sampling_stats import assert_matches

from pagemem.kernels.reference_sampling import (gumbel_noise, pack_params, philox4x32, ref_kept_mask, ref_logprobs,
                                                ref_sample, ref_sampling_probs, uniform_from_bits, unpack_params)

def rows(n: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, start=0) -> np.ndarray:
    """Settings for n rows of one request drawing at positions start .. start + n - 1."""
    return pack_params([temperature] * n, [top_k] * n, [top_p] * n, [min_p] * n, [seed] * n, range(start, start + n))


def test_philox_known_answers():
    """Philox4x32-10 against the known-answer vectors published with Random123."""
    cases = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for ctr, key, want in cases:
        got = philox4x32(np.array(ctr, dtype=np.uint64), np.array(key, dtype=np.uint64))
        assert got.tolist() == want


def test_uniforms_stay_inside_the_open_interval():
    u = uniform_from_bits(np.array([0, 0x1FF, 0xFFFFFFFF], dtype=np.uint64))
    assert u.dtype == np.float32 and 0 < u.min() and u.max() < 1
    assert u[0] == u[1]                         # only the top 23 bits count


def test_params_round_trip():
    p = pack_params([0.7, 0.0], [50, 0], [0.9, 1.0], [0.05, 0.0], [2**64 - 1, 3], [10, 2**31 - 1])
    f = unpack_params(p)
    assert p.dtype == np.int32 and p.shape == (kernels.NUM_FIELDS, 2)
    assert f["temperature"].tolist() == [np.float32(0.7), 0.0] and f["top_k"].tolist() == [50, 0]
    assert f["seed"].tolist() == [2**64 - 1, 3] and f["position"].tolist() == [10, 2**31 - 1]


@pytest.mark.parametrize("top_k, top_p, min_p, want", [
    (1, 1.0, 0.0, [0, 1]),             # both tokens tied at the top stay
    (3, 1.0, 0.0, [0, 1, 2, 3]),       # the third-largest value is tied: both copies stay
    (0, 0.5, 0.0, [0, 1, 2, 3]),       # mass reaches 0.5 inside the tie at 0.15: the whole tie stays
    (0, 0.35, 0.0, [0, 1]),            # the first tied pair already holds 0.4
    (0, 1.0, 0.5, [0, 1, 2, 3, 4, 5]),  # p >= 0.5 * 0.2
    (0, 1.0, 0.6, [0, 1, 2, 3]),
    (0, 1.0, 0.8, [0, 1]),
    (2, 0.9, 0.0, [0, 1]),             # top-p over what top-k kept (renormalized)
])
def test_kept_set_keeps_ties_at_every_threshold(top_k, top_p, min_p, want):
    z = np.log(np.array([0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05]))
    assert np.flatnonzero(ref_kept_mask(z, top_k, top_p, min_p)).tolist() == want


def test_greedy_rows_take_the_argmax(rng):
    logits = rng.standard_normal((6, 40)).astype(np.float32)
    params = pack_params([0, 0, 0, 1.0, 1.0, 1.0], [0, 0, 5, 1, 1, 1], [1.0] * 6, [0.0] * 6, range(6), range(6))
    np.testing.assert_array_equal(ref_sample(logits, params), logits.argmax(axis=1))
    np.testing.assert_array_equal(kernels.sample(logits, params), logits.argmax(axis=1))


LOGITS = np.array([2.0, 1.5, 1.5, 0.3, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)
SETTINGS = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=3),
            dict(temperature=0.9, top_p=0.7), dict(temperature=1.0, min_p=0.2),
            dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_reference_draws_follow_the_target_distribution(setting):
    n = 20_000
    params = rows(n, **setting)
    draws = ref_sample(np.tile(LOGITS, (n, 1)), params)
    probs = ref_sampling_probs(LOGITS[None], params[:, :1])[0]
    assert_matches(draws, probs)


def test_target_distribution_is_softmax_over_the_kept_set():
    probs = ref_sampling_probs(LOGITS[None], rows(1, temperature=0.5, top_k=4))[0]
    z = LOGITS.astype(np.float64) / 0.5
    want = np.where(np.arange(8) < 4, np.exp(z - z.max()), 0)      # the four largest (1.5 tied twice)
    np.testing.assert_allclose(probs, want / want.sum(), rtol=1e-12)


def test_draws_depend_only_on_seed_and_position(rng):
    """A row draws the same token alone and among others; another seed or position changes it."""
    logits = rng.standard_normal((300, 64)).astype(np.float32)
    params = rows(300, temperature=1.0, top_p=0.95, seed=11)
    params[:, 5:] = rows(295, temperature=0.8, top_k=10, seed=99, start=40)
    batch = ref_sample(logits, params)
    alone = [int(ref_sample(logits[i:i + 1], params[:, i:i + 1])[0]) for i in range(5)]
    assert batch[:5].tolist() == alone
    same = np.tile(logits[:1], (64, 1))
    moved = ref_sample(same, rows(64, temperature=1.0, top_p=0.95, seed=11))
    assert len(set(moved.tolist())) > 1          # positions give fresh draws
    seeds = pack_params([1.0] * 64, [0] * 64, [0.95] * 64, [0.0] * 64, range(64), [0] * 64)
    assert len(set(ref_sample(same, seeds).tolist())) > 1    # so do seeds, at one position


def test_logprobs_reference_by_hand():
    params = rows(2, temperature=0.5)
    params[:, 1:] = pack_params([0.0], [0], [1.0], [0.0], [0], [0])       # greedy: temperature 1
    logits = np.tile(np.log(np.array([0.5, 0.3, 0.2], dtype=np.float64)), (2, 1)).astype(np.float32)
    chosen, ids, lps = ref_logprobs(logits, params, np.array([1, 2], np.int32), 2)
    z = np.log([0.5, 0.3, 0.2]) / 0.5
    lp = z - np.log(np.exp(z).sum())
    np.testing.assert_allclose(chosen, [lp[1], np.log(0.2)], rtol=1e-5)
    assert ids.tolist() == [[0, 1], [0, 1]]
    np.testing.assert_allclose(lps[1], np.log([0.5, 0.3]), rtol=1e-5)


def test_sample_checks_its_arguments():
    logits = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="params"):
        kernels.sample(logits, rows(3))
    with pytest.raises(TypeError, match="params"):
        kernels.sample(logits, rows(2).astype(np.int64))
    with pytest.raises(TypeError, match="logits"):
        kernels.sample(logits.astype(np.int32), rows(2))
    with pytest.raises(ValueError, match="logits"):
        kernels.sample(np.zeros((2, 8, 1), np.float32), rows(2))
    with pytest.raises(ValueError, match="num_top"):
        kernels.sample_logprobs(logits, rows(2), np.zeros(2, np.int32), 21)
    with pytest.raises(ValueError, match="out"):
        kernels.sample(logits, rows(2), out=np.zeros(2, np.int64))


# ---- the CUDA kernel, under the simulator ---------------------------------------------------
needs_sim = pytest.mark.skipif(not SIM, reason="runs the CUDA kernel in the Numba simulator (CPU runs)")


def _kernel_draws(logits, params, cap=2048, split=1):
    from pagemem.kernels.sampling_kernel import sample_cuda
    out = np.full(logits.shape[0], -1, dtype=np.int32)
    sample_cuda(logits, params, out, None, threads=32, cap=cap, split=split)
    return out


def _gumbel_oracle(logits, params) -> np.ndarray:
    """The draw the kernel defines: argmax over the kept set of (Gumbel noise - d), float32."""
    f = unpack_params(params)
    out = []
    for r in range(logits.shape[0]):
        t = float(f["temperature"][r])
        z = logits[r].astype(np.float32) * np.float32(1 / t)
        d = z.max() - z
        g = gumbel_noise(int(f["seed"][r]), int(f["position"][r]), z.size)
        keep = ref_kept_mask(z.astype(np.float64), int(f["top_k"][r]), float(f["top_p"][r]), float(f["min_p"][r]))
        out.append(int(np.argmax(np.where(keep, g - d, -np.inf))))
    return np.asarray(out)


@needs_sim
@pytest.mark.parametrize("cap", [2048, 32], ids=["gathered", "radix"])
def test_kernel_draws_are_the_gumbel_max_of_the_kept_set(rng, cap):
    """Each filter path (one pass, min-p, top-k, top-p and combinations) draws exactly the
    Gumbel-max token of the reference's kept set; cap=32 forces the radix levels and the full
    draw pass instead of finishing in shared memory."""
    v = 160
    logits = (rng.standard_normal((6, v)) * 0.7).astype(np.float32)
    params = pack_params([1.0, 0.8, 1.2, 0.9, 0.7, 1.0], [0, 0, 40, 0, 50, 100], [1.0, 1.0, 1.0, 0.9, 0.8, 0.95],
                         [0.0, 0.1, 0.0, 0.0, 0.02, 0.0], [1, 2, 3, 4, 5, 6], [3, 9, 27, 81, 243, 729])
    np.testing.assert_array_equal(_kernel_draws(logits, params, cap), _gumbel_oracle(logits, params))


def _position_tempting_a_dropped_token(z: np.ndarray, keep: np.ndarray, seed: int) -> int:
    """A position whose Gumbel noise makes one of the four tokens ranked just below the kept set
    beat every kept token: a kernel that lets any of them through draws it there."""
    order = np.argsort(-z, kind="stable")
    near = np.zeros_like(keep)
    near[order[keep.sum():keep.sum() + 4]] = True
    d = z.max() - z
    for pos in range(5000):
        score = gumbel_noise(seed, pos, z.size) - d
        if near[np.argmax(np.where(keep | near, score, -np.inf))]:
            return pos
    raise AssertionError("no tempting position found")


@needs_sim
@pytest.mark.parametrize("cap", [2048, 32], ids=["gathered", "radix"])
def test_kernel_cuts_exactly_at_each_threshold(cap):
    """Logits 0.01 apart, so the cut falls inside a histogram bin; at a position where a token
    just past the cut would win the draw, the kernel must still draw a kept token (the oracle's)."""
    z = (-0.01 * np.arange(64)).astype(np.float32)
    cases = [dict(top_k=40), dict(top_k=20), dict(top_p=0.6), dict(min_p=float(np.exp(-0.3))),
             dict(top_k=50, top_p=0.7), dict(top_k=12, top_p=0.9)]
    logits, cols = np.tile(z, (len(cases), 1)), []
    for i, c in enumerate(cases):
        keep = ref_kept_mask(z.astype(np.float64), c.get("top_k", 0), c.get("top_p", 1.0), c.get("min_p", 0.0))
        assert 4 <= keep.sum() <= 60
        cols.append(rows(1, temperature=1.0, seed=i, start=_position_tempting_a_dropped_token(z, keep, i), **c))
    params = np.concatenate(cols, axis=1)
    np.testing.assert_array_equal(_kernel_draws(logits, params, cap), _gumbel_oracle(logits, params))


@needs_sim
def test_kernel_never_draws_outside_a_tied_kept_set():
    """Logits with exact ties at the top-k and top-p thresholds: every draw is kept."""
    z = np.repeat(np.array([3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32), [2, 3, 1, 4, 1, 1, 20])
    n = 4
    logits = np.tile(z, (n, 1))
    for setting in (dict(top_k=3), dict(top_k=6, top_p=0.5), dict(top_p=0.6), dict(min_p=0.3)):
        params = rows(n, temperature=1.0, **setting)
        keep = ref_kept_mask(z.astype(np.float64), setting.get("top_k", 0), setting.get("top_p", 1.0),
                             setting.get("min_p", 0.0))
        for cap in (2048, 32):
            draws = _kernel_draws(logits, params, cap)
            assert keep[draws].all(), (setting, cap, draws, np.flatnonzero(keep))


@needs_sim
@pytest.mark.parametrize("vocab", [70, 72])
def test_kernel_greedy_and_fp16_logits(rng, vocab):
    """fp16 rows read as words (72: 8-byte rows) or as scalars (70), the one-pass rows spread
    over two blocks."""
    logits = rng.standard_normal((4, vocab)).astype(np.float16)
    params = pack_params([0.0, 1.0, 0.5, 1.0], [0, 1, 0, 0], [1.0, 1.0, 0.9, 1.0], [0.0] * 4, [1, 2, 3, 4], [0] * 4)
    got = _kernel_draws(logits, params, split=2)
    assert got[:2].tolist() == logits[:2].astype(np.float32).argmax(axis=1).tolist()
    np.testing.assert_array_equal(got[2:], _gumbel_oracle(logits[2:].astype(np.float32), params[:, 2:]))


@needs_sim
@pytest.mark.parametrize("dtype, vocab", [(np.float32, 2002), (np.float16, 2048)])
def test_kernel_rows_of_several_tiles(rng, dtype, vocab):
    """Rows long enough that each of 32 threads reads several tiles of quads (loads clamped past
    the row's last whole quad and skipped), fp32 ending in a half quad (2002): every path draws
    the oracle's token, greedy the argmax, one-pass rows also spread over two blocks."""
    logits = (rng.standard_normal((5, vocab)) * 2).astype(dtype)
    params = pack_params([0.0, 1.0, 0.8, 0.7, 1.1], [0, 0, 50, 0, 20], [1.0, 1.0, 0.9, 1.0, 0.8],
                         [0.0, 0.0, 0.0, 0.05, 0.0], [11, 12, 13, 14, 15], [7, 8, 9, 10, 11])
    want = _gumbel_oracle(logits[1:].astype(np.float32), params[:, 1:])
    for split in (1, 2):
        got = _kernel_draws(logits, params, split=split)
        assert got[0] == int(logits[0].astype(np.float32).argmax())
        np.testing.assert_array_equal(got[1:], want)


@needs_sim
@pytest.mark.parametrize("cap", [2048, 32])
def test_kernel_logprobs_match_the_reference(rng, cap):
    from pagemem.kernels.sampling_kernel import logprobs_cuda
    logits = rng.standard_normal((3, 90)).astype(np.float32)
    logits[2, 10:80] = 5.0                       # 70 ties at the top: more than cap=32 share the bound
    params = pack_params([0.7, 0.0, 1.0], [0] * 3, [1.0] * 3, [0.0] * 3, [1, 2, 3], [0, 0, 0])
    tokens = np.array([4, 9, 50], np.int32)
    chosen, ids, lps = (np.zeros(3, np.float32), np.zeros((3, 6), np.int32), np.zeros((3, 6), np.float32))
    logprobs_cuda(logits, params, tokens, 6, chosen, ids, lps, None, threads=32, cap=cap)
    want = ref_logprobs(logits, params, tokens, 6)
    np.testing.assert_allclose(chosen, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids, want[1])
    np.testing.assert_allclose(lps, want[2], rtol=1e-5, atol=1e-5)
