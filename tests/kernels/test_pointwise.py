"""RMSNorm (with the residual add), RoPE and SwiGLU: the CPU path and the CUDA kernels (under the
simulator in CI, at real sizes on a GPU) against the float64 references, and against each other.

The kernels round to the model dtype at the same points as the CPU path, so kernel and CPU path
agree to one rounding of the output; each agrees with the float64 reference to a few roundings.
"""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import DTYPES

from pagemem import kernels
from pagemem.kernels._device import SIM, dtype_kind
from pagemem.kernels.reference import ref_rms_norm, ref_rope, ref_silu_mul

# (rtol, atol) against float64: about four roundings of O(1) values in the dtype.
TOL = {np.dtype(np.float16): (4e-3, 4e-3), DTYPES[1]: (3e-2, 3e-2), np.dtype(np.float32): (2e-5, 2e-5)}
# kernel vs CPU path: one rounding of the output (an ulp at |x| < 8).
ULP = {np.dtype(np.float16): 8e-3, DTYPES[1]: 6.3e-2, np.dtype(np.float32): 1e-5}


def _close(got, want, dtype, tol=None):
    rtol, atol = tol or TOL[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def _norm_inputs(rng, tokens, hidden, dtype):
    x = rng.standard_normal((tokens, hidden)).astype(dtype)
    res = (2 * rng.standard_normal((tokens, hidden))).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(hidden)).astype(dtype)
    return x, res, w


def _rope_inputs(rng, tokens, heads, head_dim, dtype):
    x = rng.standard_normal((tokens, heads + 3, head_dim)).astype(dtype)[:, :heads]   # strided rows
    positions = rng.permutation(4096)[:tokens].astype(np.int32)
    inv_freq = (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    return x, positions, inv_freq


# ---- the CPU path (what CPU generation runs) ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_cpu(rng, dtype):
    x, res, w = _norm_inputs(rng, 5, 48, dtype)
    want, want_res = ref_rms_norm(x, w, 1e-5)
    _close(kernels.rms_norm(x, w, 1e-5), want, dtype)
    want, want_res = ref_rms_norm(x, w, 1e-5, residual=res)
    got = kernels.rms_norm(x, w, 1e-5, residual=res)
    np.testing.assert_array_equal(res, want_res)       # residual += x, stored in the dtype
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_and_silu_mul_cpu(rng, dtype):
    x, positions, inv_freq = _rope_inputs(rng, 6, 4, 16, dtype)
    want = ref_rope(x, positions, inv_freq)
    kernels.apply_rope(x, positions, inv_freq)
    _close(x, want, dtype)
    gate_up = rng.standard_normal((6, 40)).astype(dtype)
    _close(kernels.silu_mul(gate_up), ref_silu_mul(gate_up), dtype)


def test_pointwise_argument_errors(rng):
    x, res, w = _norm_inputs(rng, 2, 8, np.float16)
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(x, w, 1e-5, residual=res[:, :4])
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, w.astype(np.float32), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        kernels.rms_norm(x, w, 0.0)
    with pytest.raises(TypeError, match="x"):
        kernels.rms_norm(x.astype(np.int32), w, 1e-5)
    q, positions, inv_freq = _rope_inputs(rng, 3, 2, 8, np.float16)
    with pytest.raises(ValueError, match="positions"):
        kernels.apply_rope(q, positions[:2], inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        kernels.apply_rope(q, positions, inv_freq.astype(np.float64))
    with pytest.raises(ValueError, match="gate_up"):
        kernels.silu_mul(np.zeros((2, 7), np.float16))


# ---- the CUDA kernels -----------------------------------------------------------------------
def _run_kernels(xp, x, res, w, q, positions, inv_freq, gate_up, threads=None):
    """Each kernel's output on ``xp`` arrays (NumPy: the simulator), as NumPy."""
    from pagemem.kernels.pointwise import rms_norm_cuda, rope_cuda, silu_mul_cuda
    get = (lambda a: a) if xp is np else (lambda a: a.get())
    kind = dtype_kind(x.dtype, "x")
    tune = {} if threads is None else {"threads": threads}
    x, res, w, positions, inv_freq, gate_up = (xp.asarray(a) if xp is not np else a.copy()
                                               for a in (x, res, w, positions, inv_freq, gate_up))
    rows = xp.empty((q.shape[0], q.shape[1] + 3, q.shape[2]), q.dtype)
    rows[:, :q.shape[1]] = xp.asarray(q)
    q = rows[:, :q.shape[1]]                       # rows strided, as the q and k heads of qkv
    plain = rms_norm_cuda(x, w, 1e-5, None, xp.empty_like(x), kind, None, **tune)
    added = rms_norm_cuda(x, w, 1e-5, res, xp.empty_like(x), kind, None, **tune)
    rope_cuda(q, positions, inv_freq, kind, None, **tune)
    swiglu = silu_mul_cuda(gate_up, xp.empty((gate_up.shape[0], gate_up.shape[1] // 2), gate_up.dtype), kind,
                           None, **tune)
    return get(plain), get(added), get(res), get(q), get(swiglu)


def _check_kernels(rng, xp, dtype, tokens, hidden, heads, head_dim, inter, threads=None):
    x, res, w = _norm_inputs(rng, tokens, hidden, dtype)
    q, positions, inv_freq = _rope_inputs(rng, tokens, heads, head_dim, dtype)
    gate_up = (3 * rng.standard_normal((tokens, 2 * inter))).astype(dtype)
    got = _run_kernels(xp, x, res, w, q, positions, inv_freq, gate_up, threads)
    cpu_res, cpu_q = res.copy(), q.copy()
    cpu = (kernels.rms_norm(x, w, 1e-5), kernels.rms_norm(x, w, 1e-5, residual=cpu_res), cpu_res,
           (kernels.apply_rope(cpu_q, positions, inv_freq), cpu_q)[1], kernels.silu_mul(gate_up))
    refs = (ref_rms_norm(x, w, 1e-5)[0], ref_rms_norm(x, w, 1e-5, res)[0], ref_rms_norm(x, w, 1e-5, res)[1],
            ref_rope(q, positions, inv_freq), ref_silu_mul(gate_up))
    for name, g, c, r in zip(("rms_norm", "rms_norm+residual", "residual", "rope", "silu_mul"), got, cpu, refs):
        assert not np.isnan(np.asarray(g, np.float32)).any(), name
        _close(g, np.asarray(r, np.float64), dtype)
        _close(g, np.asarray(c, np.float64), dtype, (0, ULP[np.dtype(dtype)]))


@pytest.mark.skipif(not SIM, reason="simulator test (a CUDA device runs the GPU one)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_kernels_simulator(rng, dtype):
    """Tiny sizes: 40 hidden over 16 threads leaves a partial last step; head_dim 8 rows strided."""
    _check_kernels(rng, np, dtype, tokens=3, hidden=40, heads=3, head_dim=8, inter=20, threads=16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,heads,head_dim,inter", [(2048, 40, 64, 8192), (896, 16, 64, 4864),
                                                         (4096, 40, 128, 14336)])
def test_pointwise_kernels_gpu(rng, dtype, hidden, heads, head_dim, inter):
    """Real layer shapes (Llama-3.2-1B, Qwen2.5-0.5B, Llama-3-8B: q + k heads for RoPE)."""
    import cupy as cp
    _check_kernels(rng, cp, dtype, tokens=70, hidden=hidden, heads=heads, head_dim=head_dim, inter=inter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_silu_mul_write_the_callers_out(rng, dtype):
    """A caller's ``out`` is written in place and is the very array returned, with and without a
    residual; the values are those of a call without ``out``."""
    x, res, w = _norm_inputs(rng, 5, 48, dtype)
    out = np.full_like(x, np.nan)
    assert kernels.rms_norm(x, w, 1e-5, out=out) is out
    np.testing.assert_array_equal(out, kernels.rms_norm(x, w, 1e-5))
    res2 = res.copy()
    want = kernels.rms_norm(x, w, 1e-5, residual=res2)
    out = np.full_like(x, np.nan)
    assert kernels.rms_norm(x, w, 1e-5, residual=res, out=out) is out
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(res, res2)
    gate_up = rng.standard_normal((6, 40)).astype(dtype)
    out = np.full((6, 20), np.nan, dtype=dtype)
    assert kernels.silu_mul(gate_up, out=out) is out
    np.testing.assert_array_equal(out, kernels.silu_mul(gate_up))
