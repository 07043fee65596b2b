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
    split = len(lens) == 2                     # the rule splits few long sequences; the batch runs whole
    plan = kernels.plan_decode(pt, ctx, 8, kv[:, 0, 0], host_context_lens=p.context_lens,
                               **({} if split else {"num_partitions": 1}))
    assert (plan.num_partitions > 1) == split
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
    if plan.kernel_name == "tc":              # a cache 2 bytes past an aligned base: refused, nothing launched
        raw = cp.zeros(kv.nbytes + 16, cp.uint8)
        shifted = raw[2:2 + kv.nbytes].view(dtype).reshape(kv.shape)
        k_bad = cp.lib.stride_tricks.as_strided(shifted[:, 1, 0], kv[:, 1, 0].shape, kv[:, 1, 0].strides)
        out[...] = 7
        with pytest.raises(ValueError, match="16-byte"):
            plan.run(q, k_bad, kv[:, 1, 1], out)
        assert bool((out == 7).all())


@pytest.mark.parametrize("num_blocks,span,head_dim,want", [
    (512, 2048, 128, (2, 1)),     # 64 x 2048, 32/8: one wave of 2-warp blocks (4 warps: 1.3 waves)
    (256, 2048, 128, (4, 1)),     # 64 x 2048, 28/4: 2-warp blocks would leave 4 warps an SM
    (2048, 512, 128, (2, 1)),     # 256 x 512: 8 warps would stream 4 tiles each
    (2048, 512, 64, (2, 1)),      # head_dim 64: 4-warp blocks waste a little less of their last wave
    (1024, 2048, 128, (4, 1)),    # 32 x 2048, 32/32 (MHA): 2-warp blocks leave half their last wave idle
    (8, 32768, 128, (8, 16)),     # 1 x 32768: split-K, 8-warp blocks filling the SMs once
    (128, 2048, 64, (8, 2)),      # 64 x 2048, 14/2: split-K
])
def test_tensor_core_launch_rule(num_blocks, span, head_dim, want):
    """The shapes of the H100 matrix (bench/RESULTS.md) get the launch that measured best there."""
    from pagemem.kernels.decode_plan import tc_launch
    warps, parts, part_tokens = tc_launch(num_blocks, span, 16, head_dim, 132)
    assert (warps, parts) == want
    assert parts * part_tokens >= span and part_tokens % 16 == 0


def test_tensor_core_launch_gives_every_warp_enough_tiles():
    """Over a grid of batches and contexts: a warp streams at least MIN_ROUNDS tiles unless even
    2 warps could not, the merge buffer fits shared memory, and a split covers the whole span."""
    from pagemem.kernels.decode_plan import MIN_ROUNDS, tc_launch
    from pagemem.kernels.decode_tc import MAX_HEADS, MAX_SHARED_FLOATS
    for num_blocks in (1, 8, 64, 200, 512, 4096, 65536):
        for span in (16, 256, 512, 2048, 8192, 131072):
            for head_dim in (64, 128, 256):
                warps, parts, part_tokens = tc_launch(num_blocks, span, 16, head_dim, 132)
                tiles = -(-part_tokens // 16)
                assert warps in (1, 2, 4, 8) and warps * MAX_HEADS * head_dim <= MAX_SHARED_FLOATS
                assert -(-tiles // warps) >= MIN_ROUNDS or warps <= 2 or parts > 1, (num_blocks, span, warps)
                assert parts * part_tokens >= span
