"""plan_decode / DecodePlan.run: one plan per step, run on every layer's cache view, equal to the
reference; the per-layer checks; the GPU's prepared launches across layers, strides and split-K."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import DTYPES, assert_close, make_paged, queries

from pagemem import kernels
from pagemem.kernels.reference import ref_paged_decode

LENS = [1, 3, 4, 5, 11]          # page_size 4 edges


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_runs_every_layer(rng, dtype):
    """One plan, both layers of a page-major pool (strided views), equal to the reference."""
    p = make_paged(rng, LENS, num_kv_heads=2, head_dim=16, page_size=4, dtype=dtype)
    plan = kernels.plan_decode(p.page_tables, p.context_lens, 6, p.k)
    for layer in (0, 1):
        k, v = p.kv[:, layer, 0], p.kv[:, layer, 1]
        q = queries(rng, len(LENS), 6, 16, dtype)
        assert_close(plan.run(q, k, v), ref_paged_decode(q, k, v, p.page_tables, p.context_lens), dtype)


def test_plan_with_a_window_and_a_scale(rng):
    p = make_paged(rng, [9, 12], num_kv_heads=1, head_dim=8, page_size=4, dtype=np.float32)
    q = queries(rng, 2, 3, 8, np.float32)
    plan = kernels.plan_decode(p.page_tables, p.context_lens, 3, p.k, scale=0.2, sliding_window=5)
    out = np.zeros_like(q)
    assert plan.run(q, p.k, p.v, out) is out
    assert_close(out, ref_paged_decode(q, p.k, p.v, p.page_tables, p.context_lens, scale=0.2, sliding_window=5),
                 np.dtype(np.float32))


def test_plan_checks_the_batch(rng):
    p = make_paged(rng, [5, 8], page_size=4)
    with pytest.raises(ValueError, match="num_q_heads"):
        kernels.plan_decode(p.page_tables, p.context_lens, 0, p.k)
    with pytest.raises(ValueError, match="num_q_heads"):
        kernels.plan_decode(p.page_tables, p.context_lens, 3, p.k)        # not a multiple of 2 kv heads
    with pytest.raises(ValueError, match="context_lens"):
        kernels.plan_decode(p.page_tables, np.array([5, 0], np.int32), 4, p.k)
    with pytest.raises(ValueError, match="context_lens"):
        kernels.plan_decode(p.page_tables, np.array([5, 99], np.int32), 4, p.k)
    with pytest.raises(TypeError, match="context_lens"):
        kernels.plan_decode(p.page_tables, p.context_lens.astype(np.int64), 4, p.k)
    with pytest.raises(ValueError, match="sliding_window"):
        kernels.plan_decode(p.page_tables, p.context_lens, 4, p.k, sliding_window=0)


def test_run_checks_each_layers_arrays(rng):
    p = make_paged(rng, [5, 8], page_size=4, dtype=np.float16)
    plan = kernels.plan_decode(p.page_tables, p.context_lens, 4, p.k)
    q = queries(rng, 2, 4, 16, np.float16)
    with pytest.raises(ValueError, match="q, out"):
        plan.run(q[:1], p.k, p.v)
    with pytest.raises(ValueError, match="k_cache"):
        plan.run(q, np.ascontiguousarray(p.k), p.v)                         # other strides than planned
    with pytest.raises(ValueError, match="v_cache"):
        plan.run(q, p.k, p.v.astype(np.float32))
    with pytest.raises(TypeError, match="q, out"):
        plan.run(q.astype(np.float32), p.k, p.v)


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1, 15, 16, 17, 300, 2000], [30000, 5000]], ids=["batch", "split-k"])
def test_gpu_plan_reuses_its_launch_across_layers_and_strides(rng, lens):
    """After the first run, launches go through the prepared argument tuple: later layers (other
    pointers), a contiguous q (other strides: the generic launch again) and split-K plans all
    still equal the reference."""
    import cupy as cp
    dtype = np.dtype(np.float16)
    p = make_paged(rng, lens, num_kv_heads=2, head_dim=128, page_size=16, dtype=dtype)
    kv = cp.asarray(p.kv)
    pt, ctx = cp.asarray(p.page_tables), cp.asarray(p.context_lens)
    plan = kernels.plan_decode(pt, ctx, 8, kv[:, 0, 0], host_context_lens=p.context_lens)
    assert (plan.num_partitions > 1) == (len(lens) == 2)
    wide = queries(rng, len(lens), 12, 128, dtype)                          # q as a strided view of it
    for layer in (0, 1, 0, 1):
        kv[:, layer] = cp.asarray(rng.standard_normal(p.kv[:, layer].shape).astype(dtype))
        kv[0] = cp.nan
        qg = cp.asarray(wide)[:, 2:10]
        out = plan.run(qg, kv[:, layer, 0], kv[:, layer, 1])
        want = ref_paged_decode(qg.get(), kv[:, layer, 0].get(), kv[:, layer, 1].get(), p.page_tables, p.context_lens)
        assert_close(out.get(), want, dtype)
    q = cp.ascontiguousarray(qg)
    out = plan.run(q, kv[:, 1, 0], kv[:, 1, 1])
    assert_close(out.get(), ref_paged_decode(q.get(), kv[:, 1, 0].get(), kv[:, 1, 1].get(), p.page_tables,
                                              p.context_lens), dtype)
