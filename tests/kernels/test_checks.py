"""Launch-time checks: a caller's mistake raises TypeError or ValueError naming the argument,
before any work is done (the shared checks guard the CPU and CUDA paths alike)."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import make_paged, queries, query_start_loc

from pagemem import kernels


@pytest.fixture
def case(rng):
    p = make_paged(rng, [5, 9])
    return p, queries(rng, 2, 4, 16, np.float16)


def _decode(p, q0, **kw):
    args = dict(q=q0, k_cache=p.k, v_cache=p.v, page_tables=p.page_tables, context_lens=p.context_lens)
    args.update(kw)
    return kernels.paged_decode(**args)


@pytest.mark.parametrize("name,value,exc,match", [
    ("q", "q.astype(np.int8)", TypeError, "q: dtype"),
    ("k_cache", "p.k.astype(np.float64)", TypeError, "k_cache: dtype"),
    ("v_cache", "p.v.astype(np.float32)", TypeError, "v_cache: dtype"),
    ("page_tables", "p.page_tables.astype(np.int64)", TypeError, "page_tables: dtype"),
    ("context_lens", "p.context_lens[:1]", ValueError, "context_lens"),
    ("q", "q[:, :3]", ValueError, "num_q_heads=3"),
    ("q", "q[..., :8]", ValueError, "q: expected"),
    ("k_cache", "p.k[..., ::2]", ValueError, "k_cache"),
    ("k_cache", "p.k[:, :3]", ValueError, "k_cache"),
    ("v_cache", "np.ascontiguousarray(p.v)", ValueError, "v_cache: strides"),
    ("out", "np.empty((2, 4, 8), np.float16)", ValueError, "out: shape"),
    ("q", "q.tolist()", TypeError, "q: expected a numpy or cupy array"),
])
def test_decode_rejects(case, name, value, exc, match):
    """Each bad argument raises the exact exception type, naming itself."""
    p, q = case
    with pytest.raises(exc, match=match):
        _decode(p, q, **{name: eval(value)})


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_bad_sliding_window(case, window):
    p, q = case
    with pytest.raises(ValueError, match="sliding_window"):
        _decode(p, q, sliding_window=window)


def test_prefill_rejects_bad_query_start_loc(case):
    p, _ = case
    q = np.zeros((6, 4, 16), np.float16)
    with pytest.raises(ValueError, match="query_start_loc"):
        kernels.paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, query_start_loc([2, 4])[:2])
    with pytest.raises(TypeError, match="query_start_loc: dtype"):
        kernels.paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, np.array([0, 2, 6]))
    with pytest.raises(ValueError, match="query_start_loc: seq 0 has 7"):
        kernels.paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, np.array([0, 7, 6], np.int32))


def test_store_kv_rejects(rng):
    p = make_paged(rng, [8])
    k = rng.standard_normal((2, 2, 16)).astype(np.float16)
    slots = np.array([5, 6], np.int32)
    with pytest.raises(TypeError, match="k: dtype"):
        kernels.store_kv(k.astype(np.float32), k, p.k, p.v, slots)
    with pytest.raises(ValueError, match="v: expected"):
        kernels.store_kv(k, k[:, :1], p.k, p.v, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.store_kv(k, k, p.k, p.v, slots[:1])
    with pytest.raises(ValueError, match="slot_mapping: page ids \\[0\\]"):
        kernels.store_kv(k, k, p.k, p.v, np.array([1, 6], np.int32))   # slot 1 is in NULL_PAGE


def test_split_rule_fills_one_wave():
    """Few long sequences split until the grid fits the SMs once (2 resident blocks of 256
    threads each on 132 SMs: 264 slots); a full grid or a short span never splits."""
    from pagemem.kernels.decode import split_rule
    assert split_rule(64, 8192, 16, 132) == (4, 2048)       # 8 seqs x 8 KV heads -> 256 blocks
    assert split_rule(8, 32768, 16, 132) == (33, 1008)      # 1 seq -> 264 blocks
    assert split_rule(8, 32768, 16, 132, resident=4) == (64, 512)  # 66 wanted; whole 512-token parts
    assert split_rule(512, 8192, 16, 132) == (1, 8192)      # enough blocks already
    assert split_rule(200, 8192, 16, 132) == (1, 8192)      # splitting would need a second wave
    assert split_rule(8, 512, 16, 132) == (1, 512)          # short contexts never split


def test_batched_gemm_on_numpy_and_its_cublas_types(rng):
    """The prefill GEMM's NumPy route is a float32-accumulated batched matmul in a's dtype, both
    layouts of b; cuda_type names fp16/bf16/fp32 and refuses any other dtype by name."""
    import ml_dtypes
    from pagemem.kernels import gemm
    a = rng.standard_normal((3, 5, 8)).astype(np.float16)
    b = rng.standard_normal((3, 7, 8)).astype(np.float16)
    want = np.matmul(a.astype(np.float32), b.astype(np.float32).transpose(0, 2, 1))
    got = gemm.matmul(np, a, b, transpose_b=True)
    assert got.dtype == np.float16 and got.shape == (3, 5, 7)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(gemm.matmul(np, a, np.ascontiguousarray(b.transpose(0, 2, 1)), transpose_b=False), got)
    assert len({gemm.cuda_type(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32)}) == 3
    with pytest.raises(TypeError, match="float64"):
        gemm.cuda_type(np.float64)


def test_prefill_paths_on_numpy(rng):
    """NumPy arrays have no fused kernel: path='flash' names why, path='gemm' runs the cuBLAS
    route's kernels (simulator) and an unknown path is refused; none writes ``out`` first."""
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.prefill import paged_prefill_cuda
    p = make_paged(rng, [5], page_size=4)
    q = queries(rng, 5, 4, 16, np.float16)
    qsl = query_start_loc([5])
    out = np.full_like(q, np.nan)
    dims = check_attention(q, p.k, p.v, p.page_tables, p.context_lens, out, 1)
    with pytest.raises(ValueError, match="path='flash' runs on CUDA arrays only"):
        paged_prefill_cuda(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.25, out, None, 0, dims, 5, path="flash")
    with pytest.raises(ValueError, match="path must be"):
        paged_prefill_cuda(q, p.k, p.v, p.page_tables, p.context_lens, qsl, 0.25, out, None, 0, dims, 5, path="fast")
    assert np.isnan(out).all()
    assert not kernels.prefill_is_fused(p.k)


def test_flash_tiling_sizes():
    """The default block: 128 rows, shared memory within an H100's (and an A100's) opt-in
    limit, and the defines the source is compiled with."""
    from pagemem.kernels.prefill_flash import TILING, Tiling, smem_bytes, source
    assert TILING.block_m == 128
    assert smem_bytes(128, TILING) == (128 + 4 * 64) * 136 * 2 <= 163 * 1024
    assert smem_bytes(64, Tiling(stages=3)) == (64 + 6 * 64) * 72 * 2
    src = source(96, TILING, bf16=True)
    for define in ("#define HEAD_DIM 96", "#define MT 2", "#define PACK 1", "#define SUB_N 32", '#define ELEM "bf16"'):
        assert define in src
    assert "#define SUB_N 64" in source(64, Tiling(sub_n=0), bf16=False)
    assert src.index("#define HEAD_DIM 96") < src.index('extern "C" __global__') and "pagemem_flash_prefill" in src


def test_cuda_sources_ship_beside_their_loaders():
    """The CUDA C++ of the fused prefill and the swap's row copy are package files (installed
    with the wheel: pyproject's package-data), each defining the entry points its loader asks for."""
    from importlib.resources import files
    from pagemem.kernels import swap_copy
    kernels_dir = files("pagemem.kernels")
    assert "pagemem_flash_prefill" in (kernels_dir / "prefill_flash.cu").read_text()
    assert swap_copy._SRC == (kernels_dir / "swap_copy.cu").read_text()
    for b in swap_copy.WORD_BYTES:
        assert f"PAGEMEM_COPY_ROWS({b}," in swap_copy._SRC


def test_decode_lengths_the_docs_forbid(case):
    """context_len 0 (used to give NaN rows) and a context longer than its page table (used to
    raise NumPy's IndexError) are refused, naming context_lens; out is left unwritten."""
    p, q = case
    out = np.full(q.shape, 7, np.float16)
    for bad in ([0, 9], [5, 4 * p.page_tables.shape[1] + 1]):
        with pytest.raises(ValueError, match="context_lens: seq [01] has context_len"):
            _decode(p, q, context_lens=np.array(bad, np.int32), out=out)
    assert (out == 7).all()


@pytest.mark.parametrize("qsl, match", [
    ([0, 2, 5], "from 0 to num_tokens=6"),     # the last row would stay unwritten
    ([1, 3, 6], "from 0 to num_tokens=6"),
    ([0, 0, 6], "seq 0 has 0 new tokens"),
    ([0, 6, 6], "seq 0 has 6 new tokens but context_len 5"),
])
def test_prefill_query_start_loc_covers_every_row_once(case, qsl, match):
    p, _ = case
    q = np.zeros((6, 4, 16), np.float16)
    with pytest.raises(ValueError, match=f"query_start_loc: .*{match}"):
        kernels.paged_prefill(q, p.k, p.v, p.page_tables, p.context_lens, np.array(qsl, np.int32))


def test_check_host_lens_takes_host_values_only():
    """The length rule as a function of host values (what a GPU plan holds): a page table shape,
    the page size, context lens and optionally query_start_loc with the token count."""
    from pagemem.kernels._checks import check_host_lens
    check_host_lens((2, 3), 4, np.array([12, 1]), np.array([0, 12, 13]), 13)
    with pytest.raises(ValueError, match="seq 0 has context_len 13; each must be in 1..12"):
        check_host_lens((2, 3), 4, np.array([13, 1]))
    with pytest.raises(ValueError, match="query_start_loc: seq 1 has 2 new tokens but context_len 1"):
        check_host_lens((2, 3), 4, np.array([12, 1]), np.array([0, 11, 13]), 13)


def test_prefill_calls_and_warmup_lengths_follow_the_route():
    """On caches the fused kernel does not serve (here NumPy ones): prompts grouped by length
    (two long prompts share a call, the short one goes alone: 2*2000*2000 + 8*16 + 2 calls'
    cost is less than 3*2000*2000 + one call's), and one warm-up prompt per softmax variant of
    the cuBLAS route, capped at the limit."""
    from pagemem.kernels.prefill import GROUP_PENALTY, prefill_key_classes
    k = np.zeros((4, 16, 2, 64), np.float16)
    assert 2 * 2000 * 2000 + 8 * 16 + 2 * GROUP_PENALTY < 3 * 2000 * 2000 + GROUP_PENALTY
    assert kernels.prefill_calls(k, [2000, 2000, 8], [2000, 2000, 8]) == [(0, 2), (2, 3)]
    assert kernels.prefill_calls(k, [10, 12, 20], [10, 12, 20]) == [(0, 3)]      # small: one call is cheaper
    assert kernels.prefill_calls(k, [7], [9]) == [(0, 1)] and kernels.prefill_calls(k, [], []) == [(0, 0)]
    assert kernels.prefill_warmup_lengths(k, 10**6) == sorted(prefill_key_classes(2))
    assert kernels.prefill_warmup_lengths(k, 100) == [100]
