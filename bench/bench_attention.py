"""Paged attention on the GPU: effective K/V bandwidth of paged_decode against the device copy
ceiling and torch SDPA on the same K/V laid out contiguously; prefill throughput against SDPA.

Shapes are Llama-3.2-1B's (32 query heads, 8 KV heads, head_dim 128, fp16, page_size 16), pages
drawn from a random permutation of a two-layer page-major pool (so the layer views are strided).
Every working set is larger than the 50 MB L2, so repeated calls measure HBM, not cache.

    pytest bench/bench_attention.py            # pytest-benchmark groups (wall clock, synced)
    python bench/bench_attention.py            # one table: CUDA-event medians, every variant
    python bench/bench_attention.py --tune     # decode launch settings, old vs new, head_dim 64 and 128
    python bench/bench_attention.py --prefill  # the prefill line only
    python bench/bench_attention.py --matrix [--quick] [--variants] [out.json]
                                               # decode over a matrix of model shapes: plan/run, one-shot,
                                               # torch SDPA on contiguous K/V and the copy ceiling, same run;
                                               # host us per run / one-shot / plan (--quick: a minute);
                                               # --variants: other kernels and launch settings beside it
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for bench._harness; last, so installed packages win
from bench._harness import cuda_event_time_ms, device_copy_bandwidth, device_name, gpu_timed, requires_cuda  # noqa: E402

HQ, HKV, D, PAGE, LAYERS = 32, 8, 128, 16, 2
DECODE_SHAPES = [(64, 2048), (256, 512), (8, 8192), (1, 32768)]
PREFILL_SHAPE = (8, 2048)


class Case(NamedTuple):
    q: object            # [num_tokens, HQ, D] fp16
    k: object            # [num_pages, PAGE, HKV, D] strided layer view
    v: object
    page_tables: object  # [num_seqs, max_pages] int32
    context_lens: object  # [num_seqs] int32
    query_start_loc: object
    kv_bytes: int        # K and V bytes the attention must read


def make_case(num_seqs: int, context_len: int, num_new: int = 1, seed: int = 0, head_dim: int = D,
              layers: int = LAYERS, hq: int = HQ, hkv: int = HKV, page: int = PAGE, dtype: str = "float16") -> Case:
    """Paged K/V for num_seqs sequences of context_len tokens, num_new of them new queries."""
    D = head_dim  # noqa: N806
    import cupy as cp
    import ml_dtypes
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = cp.random.default_rng(seed)
    pages_per_seq = -(-context_len // page)
    num_pages = num_seqs * pages_per_seq + 1
    kv = cp.empty((num_pages, layers, 2, page, hkv, D), dtype=dt)
    for i in range(layers):   # one layer at a time: no float32 copy of the whole pool
        kv[:, i] = rng.standard_normal((num_pages, 2, page, hkv, D), dtype=cp.float32).astype(dt)
    kv[0] = cp.nan                                                        # NULL_PAGE poisoned
    perm = np.random.default_rng(seed).permutation(np.arange(1, num_pages, dtype=np.int32))
    page_tables = cp.asarray(perm.reshape(num_seqs, pages_per_seq))
    q = rng.standard_normal((num_seqs * num_new, hq, D), dtype=cp.float32).astype(dt)
    qsl = cp.arange(0, num_seqs * num_new + 1, num_new, dtype=cp.int32)
    lens = cp.full(num_seqs, context_len, dtype=cp.int32)
    kv_bytes = 2 * num_seqs * context_len * hkv * D * dt.itemsize
    return Case(q, kv[:, 1, 0], kv[:, 1, 1], page_tables, lens, qsl, kv_bytes)


def _torch(x):
    """A CuPy array as a torch tensor on the same memory (bf16 through its bits)."""
    import torch
    if x.dtype.name == "bfloat16":
        return torch.as_tensor(x.view(np.int16), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(x, device="cuda")


def _cupy(t):
    import cupy as cp
    import ml_dtypes
    import torch
    if t.dtype == torch.bfloat16:
        return cp.asarray(t.contiguous().view(torch.int16)).view(ml_dtypes.bfloat16)
    return cp.asarray(t.contiguous())


def contiguous_kv(case: Case, num_seqs: int, context_len: int):
    """The same K/V as torch tensors [num_seqs, hkv, context_len, D] (what SDPA reads)."""
    out = []
    hkv, d = case.k.shape[2], case.k.shape[3]
    for cache in (case.k, case.v):
        x = cache[case.page_tables.ravel()].reshape(num_seqs, -1, hkv, d)[:, :context_len]
        out.append(_torch(x.transpose(0, 2, 1, 3).copy()))
    return out


def sdpa_decode(case: Case, num_seqs: int, context_len: int):
    """A callable running torch SDPA decode on contiguous K/V, and its output as CuPy."""
    import torch.nn.functional as F
    k, v = contiguous_kv(case, num_seqs, context_len)
    hq, d = case.q.shape[1], case.q.shape[2]
    q = _torch(case.q).reshape(num_seqs, hq, 1, d)
    run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    return run, _cupy(run().reshape(num_seqs, hq, d))


def decode_variants(case: Case, sweep: bool = False):
    """name -> callable enqueuing one decode on the current stream; ``sweep`` adds the tuning grid
    (lanes per token, tokens per group, threads per block, register cap)."""
    import cupy as cp
    from pagemem.kernels import paged_decode
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.decode import paged_decode_cuda
    from bench.paged_decode_v1 import paged_decode_v1
    out = cp.empty_like(case.q)
    dims = check_attention(case.q, case.k, case.v, case.page_tables, case.context_lens, out, case.q.shape[0])
    args = (case.q, case.k, case.v, case.page_tables, case.context_lens)
    tuned = lambda **kw: (lambda: paged_decode_cuda(*args, D ** -0.5, out, None, 0, dims, **kw))  # noqa: E731
    variants = {"v2": lambda: paged_decode(*args, out=out), "v1 naive": lambda: paged_decode_v1(*args, D ** -0.5, out),
                "v2 1 tok uncapped": tuned(tokens_per_group=1, max_registers=None),
                "v2 2 tok capped": tuned(tokens_per_group=2),
                "v2 32 lanes": tuned(lanes=32),
                "v2 128 threads": tuned(threads=128), "v2 256 threads": tuned(threads=256),
                "v2 no split": tuned(num_partitions=1),
                "v2 split x4": tuned(num_partitions=4)}
    if sweep:
        for lanes in (16, 32):
            for tpg in (1, 2):
                for threads in (128, 256):
                    for regs in (None, 128):
                        variants[f"l{lanes} u{tpg} t{threads} r{regs or '-'}"] = tuned(
                            lanes=lanes, tokens_per_group=tpg, threads=threads, max_registers=regs)
    return variants


def check_close(name: str, got, want, tol: float = 2e-3) -> None:
    """fp16 outputs of softmax-weighted sums of N(0,1) values: |error| ~ 1 ulp at |x| < 1 (5e-4)
    plus float32 summation differences; 2e-3 is 4 ulp."""
    err = float(abs(got.astype(np.float32) - want.astype(np.float32)).max())
    assert err < tol, f"{name}: max |error| {err} >= {tol}"


# ---- pytest-benchmark -------------------------------------------------------------------------
@requires_cuda
@pytest.mark.benchmark(group="decode-attn")
@pytest.mark.parametrize("impl", ["v2", "v1 naive", "torch sdpa"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode(benchmark, shape, impl):
    num_seqs, ctx = shape
    case = make_case(num_seqs, ctx)
    try:
        sdpa, want = sdpa_decode(case, num_seqs, ctx)
    except ImportError:
        pytest.skip("torch is not installed")
    run = sdpa if impl == "torch sdpa" else decode_variants(case)[impl]
    if impl != "torch sdpa":
        check_close(impl, run(), want)
    benchmark.pedantic(gpu_timed(run), rounds=30, warmup_rounds=3)
    ms = cuda_event_time_ms(run)
    benchmark.extra_info.update(kv_bytes=case.kv_bytes, event_ms=ms, gb_per_s=case.kv_bytes / ms / 1e6,
                                share_of_copy=case.kv_bytes / (ms * 1e-3) / device_copy_bandwidth(),
                                device=device_name())


def sdpa_prefill(case: Case, num_seqs: int, seq_len: int):
    import cupy as cp
    import torch
    import torch.nn.functional as F
    k, v = contiguous_kv(case, num_seqs, seq_len)
    q = torch.as_tensor(case.q, device="cuda").reshape(num_seqs, seq_len, HQ, D).transpose(1, 2)
    run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    return run, cp.asarray(run().transpose(1, 2).reshape(num_seqs * seq_len, HQ, D))


def prefill_run(case: Case, seq_len: int, path: str = "auto", tiling=None):
    """One paged_prefill of the case; path "auto" (the public function's choice: the fused
    kernel here), "flash" with a block ``tiling`` (prefill_flash.Tiling), or "gemm" (cuBLAS route)."""
    import cupy as cp
    from pagemem.kernels import paged_prefill
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.prefill import paged_prefill_cuda
    out = cp.empty_like(case.q)
    if path == "auto":
        return lambda: paged_prefill(case.q, case.k, case.v, case.page_tables, case.context_lens,
                                     case.query_start_loc, out=out, max_query_len=seq_len)
    dims = check_attention(case.q, case.k, case.v, case.page_tables, case.context_lens, out,
                           case.context_lens.shape[0])
    scale = float(1 / np.sqrt(D))
    return lambda: paged_prefill_cuda(case.q, case.k, case.v, case.page_tables, case.context_lens,
                                      case.query_start_loc, scale, out, None, 0, dims, seq_len,
                                      path=path, tiling=tiling)


PREFILL_IMPLS = {"paged_prefill": ("auto", None), "cuBLAS route": ("gemm", None)}


@requires_cuda
@pytest.mark.benchmark(group="prefill-attn")
@pytest.mark.parametrize("impl", [*PREFILL_IMPLS, "torch sdpa"])
def test_prefill(benchmark, impl):
    num_seqs, seq_len = PREFILL_SHAPE
    case = make_case(num_seqs, seq_len, num_new=seq_len)
    try:
        sdpa, want = sdpa_prefill(case, num_seqs, seq_len)
    except ImportError:
        pytest.skip("torch is not installed")
    run = sdpa if impl == "torch sdpa" else prefill_run(case, seq_len, *PREFILL_IMPLS[impl])
    if impl != "torch sdpa":
        check_close(impl, run(), want, tol=1e-2)
    benchmark.pedantic(gpu_timed(run), rounds=10, warmup_rounds=2)
    ms = cuda_event_time_ms(run, iters=10)
    flops = 4 * num_seqs * HQ * D * seq_len * (seq_len + 1) // 2   # causal QK^T and PV
    benchmark.extra_info.update(event_ms=ms, tflops=flops / ms / 1e9, device=device_name())


# ---- CPU path (what CPU generation runs) ---------------------------------------------------------
@pytest.mark.benchmark(group="decode-attn-cpu")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_cpu(benchmark, dtype):
    """NumPy decode at a Qwen2-0.5B layer (14 q heads, 2 KV heads, head_dim 64): 8 x 1024 tokens."""
    import ml_dtypes
    from pagemem.kernels import paged_decode
    from pagemem.kernels.reference import ref_paged_decode
    rng = np.random.default_rng(0)
    num_seqs, ctx, hq, hkv, d = 8, 1024, 14, 2, 64
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    num_pages = num_seqs * ctx // PAGE + 1
    kv = rng.standard_normal((num_pages, LAYERS, 2, PAGE, hkv, d)).astype(np_dtype)
    page_tables = rng.permutation(np.arange(1, num_pages, dtype=np.int32)).reshape(num_seqs, -1)
    lens = np.full(num_seqs, ctx, np.int32)
    q = rng.standard_normal((num_seqs, hq, d)).astype(np_dtype)
    args = (q, kv[:, 1, 0], kv[:, 1, 1], page_tables, lens)
    want = ref_paged_decode(*args)
    assert abs(paged_decode(*args).astype(np.float32) - want).max() < 2e-2
    benchmark.pedantic(lambda: paged_decode(*args), rounds=20, warmup_rounds=2)
    kv_bytes = 2 * num_seqs * ctx * hkv * d * np_dtype.itemsize
    benchmark.extra_info.update(kv_bytes=kv_bytes, gb_per_s=kv_bytes / benchmark.stats.stats.median / 1e9)


# ---- decode tuning: old vs new launch settings, per head_dim --------------------------------------
OLD_DECODE = dict(heads_major=False, lanes=None, tokens_per_group=2, threads=128, max_registers=128)
# (head_dim, num_seqs, context_len, layers in the pool); 16 layers = the engine's page stride
TUNE_SHAPES = [(64, 256, 512, 2), (64, 256, 512, 16), (64, 64, 2048, 2), (64, 8, 8192, 2), (128, 64, 2048, 2),
               (128, 256, 512, 2), (128, 8, 8192, 2), (128, 1, 32768, 2)]


def tune_variants(head_dim: int) -> dict:
    """name -> paged_decode_cuda overrides; "old" is the launch of commit 0cf7d17 (batch-major grid)."""
    hm = dict(heads_major=True)
    v = {"old": OLD_DECODE, "default": {}, "old + heads_major": {**OLD_DECODE, **hm}}
    if head_dim != 64:
        v["hm l32 u1"] = dict(lanes=32, tokens_per_group=1)
    for regs, threads in [(96, 128), (80, 128), (None, 128), (128, 256)]:
        v[f"u1 t{threads} r{regs or '-'}"] = dict(tokens_per_group=1, threads=threads, max_registers=regs)
    v["u1 batch-major"] = dict(heads_major=False, tokens_per_group=1)
    return v


def kernel_regs(function) -> str:
    """"r<registers per thread>/<local bytes per thread>B" of a loaded CuPy function (blank if the
    driver query is unavailable)."""
    try:
        from cupy.cuda import driver
        regs = driver.funcGetAttribute(4, function.ptr)    # CU_FUNC_ATTRIBUTE_NUM_REGS
        local = driver.funcGetAttribute(3, function.ptr)   # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        return f"r{regs:3d}/{local:3d}B"
    except Exception:  # noqa: BLE001 -- a label only; never fail the timing over it
        return " " * 10


def tune_decode(shapes=TUNE_SHAPES) -> None:
    """Every variant of tune_variants on each (head_dim, num_seqs, context_len), in one process:
    CUDA-event median of 10 back-to-back calls (and of 1 call alone, host launch cost included, as
    bench/decode_breakdown.py times it); outputs checked against "old"; registers per thread and
    local (spill) bytes of each kernel as compiled."""
    import pagemem.kernels._arrays as arr
    import cupy as cp
    from pagemem.kernels._checks import check_attention
    from pagemem.kernels.decode import paged_decode_cuda
    copy = device_copy_bandwidth()
    print(f"# {device_name()}; device copy {copy / 1e12:.2f} TB/s; Llama-3.2-1B heads (32 q, 8 kv), fp16, page 16")
    for head_dim, num_seqs, ctx, layers in shapes:
        case = make_case(num_seqs, ctx, head_dim=head_dim, layers=layers)
        out = cp.empty_like(case.q)
        args = (case.q, case.k, case.v, case.page_tables, case.context_lens)
        dims = check_attention(*args, out, num_seqs)
        kv_bytes = 2 * num_seqs * ctx * HKV * head_dim * 2
        want, base = None, None
        variants = list(tune_variants(head_dim).items())
        for name, kw in variants if num_seqs >= 64 else variants[:3]:   # split-K shapes: grid order only
            run = lambda kw=kw: paged_decode_cuda(*args, head_dim ** -0.5, out, None, 0, dims, **kw)  # noqa: E731
            seen = len(arr._compiled)
            got = run().copy()
            new = [r for r in list(arr._compiled.values())[seen:] if hasattr(r, "function")]
            regs = kernel_regs(new[0].function) if new else " " * 10
            if want is None:
                want = got
            check_close(name, got, want)
            ms = cuda_event_time_ms(lambda: [run() for _ in range(10)], iters=15) / 10
            one = cuda_event_time_ms(run, iters=15)
            base = base or ms
            print(f"d{head_dim} {num_seqs}x{ctx:<5} L{layers:<2} {name:>24} {regs} {ms * 1e3:7.1f} us "
                  f"{kv_bytes / ms / 1e9:5.2f} TB/s {base / ms:5.2f}x of old | 1 call alone {one * 1e3:6.1f} us", flush=True)
        del case, out, want


# ---- the shape matrix ----------------------------------------------------------------------------
# (num_seqs, context_len, q heads, kv heads, head_dim, page_size, dtype, window): Llama-3 8B/70B heads
# (32/8, d128), Llama-3.2-1B (32/8, d64), Qwen2.5-7B (28/4: GQA 7), Qwen2.5-0.5B (14/2, d64),
# Llama-2-7B (32/32: MHA), Phi-3 (32/32, d96), Gemma-7B-like (16/16, d256), Mistral's window.
QUICK_MATRIX = [(64, 2048, 32, 8, 128, 16, "float16", 0), (256, 512, 32, 8, 128, 16, "float16", 0),
                (8, 8192, 32, 8, 128, 16, "float16", 0), (1, 32768, 32, 8, 128, 16, "float16", 0),
                (256, 512, 32, 8, 64, 16, "float16", 0), (1024, 256, 32, 8, 64, 16, "float16", 0),
                (64, 2048, 28, 4, 128, 16, "float16", 0), (64, 2048, 14, 2, 64, 16, "float16", 0),
                (32, 2048, 32, 32, 128, 16, "float16", 0), (32, 2048, 16, 16, 256, 16, "float16", 0),
                (64, 2048, 32, 8, 128, 16, "bfloat16", 0), (8, 8192, 32, 8, 128, 16, "float16", 4096)]
FULL_MATRIX = QUICK_MATRIX + [
    (32, 2048, 32, 32, 96, 16, "float16", 0), (32, 2048, 32, 32, 80, 16, "float16", 0),
    (32, 2048, 32, 8, 112, 16, "float16", 0), (64, 2048, 24, 8, 128, 16, "float16", 0),
    (64, 2048, 40, 8, 128, 16, "float16", 0), (64, 2048, 48, 8, 128, 16, "float16", 0),
    (64, 2048, 16, 8, 128, 16, "float16", 0), (64, 2048, 32, 8, 128, 8, "float16", 0),
    (64, 2048, 32, 8, 128, 32, "float16", 0), (32, 2048, 32, 8, 128, 16, "float32", 0),
    (1024, 1024, 32, 8, 128, 16, "float16", 0), (1024, 128, 32, 8, 128, 16, "float16", 0),
    (1, 131072, 32, 8, 128, 16, "float16", 0), (128, 1, 32, 8, 128, 16, "float16", 0),
    (16, 4096, 64, 8, 128, 16, "float16", 0)]


def sdpa_window(case: Case, num_seqs: int, ctx: int, window: int):
    """SDPA over each sequence's last ``window`` tokens (decode's view of a sliding window)."""
    import torch.nn.functional as F
    k, v = contiguous_kv(case, num_seqs, ctx)
    k, v = k[:, :, ctx - window:], v[:, :, ctx - window:]
    hq, d = case.q.shape[1], case.q.shape[2]
    q = _torch(case.q).reshape(num_seqs, hq, 1, d)
    run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    return run, _cupy(run().reshape(num_seqs, hq, d))


def matrix_row(row, copy: float, variants: dict | None = None) -> dict:
    """One shape of the matrix: the default plan's run, the one-shot call, torch SDPA on contiguous
    K/V, each checked against SDPA; ``variants`` (name -> plan_decode tuning) are timed beside them."""
    import cupy as cp
    from pagemem import kernels
    num_seqs, ctx, hq, hkv, d, page, dtype, window = row
    case = make_case(num_seqs, ctx, head_dim=d, hq=hq, hkv=hkv, page=page, dtype=dtype)
    sdpa, want = sdpa_window(case, num_seqs, ctx, window) if window else sdpa_decode(case, num_seqs, ctx)
    out = cp.empty_like(case.q)
    plan = kernels.plan_decode(case.page_tables, case.context_lens, hq, case.k, sliding_window=window or None)
    run = lambda: plan.run(case.q, case.k, case.v, out)                    # noqa: E731
    one = lambda: kernels.paged_decode(case.q, case.k, case.v, case.page_tables, case.context_lens,  # noqa: E731
                                       out=out, sliding_window=window or None)
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    for label in ("first", "relaunched"):       # the first launch goes through Numba, later ones packed
        out.fill(np.nan)
        check_close(f"plan.run ({label})", run(), want, tol)
        out.fill(np.nan)
        check_close(f"paged_decode ({label})", one(), want, tol)
    read = case.kv_bytes * (min(window, ctx) / ctx if window else 1)
    timed = {"run": run, "oneshot": one, "sdpa": sdpa}
    for name, tuning in (variants or {}).items():
        vplan = kernels.plan_decode(case.page_tables, case.context_lens, hq, case.k,
                                    sliding_window=window or None, **tuning)
        vrun = lambda p=vplan: p.run(case.q, case.k, case.v, out)          # noqa: E731
        for _ in ("first", "relaunched"):
            out.fill(np.nan)
            check_close(name, vrun(), want, tol)
        timed[name] = vrun
    t = {name: cuda_event_time_ms(lambda f=f: [f() for _ in range(10)], iters=10) / 10 for name, f in timed.items()}
    res = dict(shape=f"{num_seqs}x{ctx}", heads=f"{hq}/{hkv}", head_dim=d, page=page, dtype=dtype, window=window,
               kernel=plan.kernel_name, parts=plan.num_partitions, **{f"{k}_us": v * 1e3 for k, v in t.items()},
               run_tbps=read / t["run"] / 1e9, sdpa_tbps=read / t["sdpa"] / 1e9, vs_sdpa=t["sdpa"] / t["run"],
               of_copy=read / (t["run"] * 1e-3) / copy, run_host_us=host_us_per_call(run),
               oneshot_host_us=host_us_per_call(one),
               variants={name: t["sdpa"] / t[name] for name in (variants or {})})
    del case, plan, out
    return res


def plan_host_us(num_seqs: int = 1024, ctx: int = 128, calls: int = 50) -> float:
    """Host time of plan_decode for a batch of num_seqs sequences (one step's set-up)."""
    import time
    from pagemem import kernels
    case = make_case(num_seqs, ctx, head_dim=64)
    host = np.full(num_seqs, ctx, np.int32)
    kernels.plan_decode(case.page_tables, case.context_lens, HQ, case.k, host_context_lens=host)
    t0 = time.perf_counter()
    for _ in range(calls):
        kernels.plan_decode(case.page_tables, case.context_lens, HQ, case.k, host_context_lens=host)
    return (time.perf_counter() - t0) / calls * 1e6


# --variants: the decode kernels and launch settings timed beside the default on each shape
MATRIX_VARIANTS = {"cuda cores": {"kernel": "simt"}, "tc 2 warps": {"threads": 64}, "tc 4 warps": {"threads": 128},
                   "tc 8 warps": {"threads": 256}}


def run_matrix(quick: bool, json_path: str | None, variants: dict | None = None) -> None:
    import json
    copy = device_copy_bandwidth()
    print(f"# {device_name()}; device copy {copy / 1e12:.2f} TB/s; us per call: CUDA-event median of 10 "
          f"back-to-back calls; host us: enqueue cost per call")
    print(f"{'shape':>11} {'heads':>6} {'d':>4} {'pg':>3} {'dtype':>8} {'win':>5} {'parts':>5} {'run us':>8} "
          f"{'1-shot':>8} {'sdpa us':>8} {'TB/s':>5} {'sdpa':>5} {'vs sdpa':>7} {'of copy':>7} {'host run':>8} "
          f"{'host 1-sh':>9}" + "".join(f" {name[:10]:>10}" for name in variants or {}))
    rows = []
    for row in QUICK_MATRIX if quick else FULL_MATRIX:
        r = matrix_row(row, copy, variants)
        rows.append(r)
        print(f"{r['shape']:>11} {r['heads']:>6} {r['head_dim']:>4} {r['page']:>3} {r['dtype']:>8} {r['window']:>5} "
              f"{r['parts']:>5} {r['run_us']:>8.1f} {r['oneshot_us']:>8.1f} {r['sdpa_us']:>8.1f} {r['run_tbps']:>5.2f} "
              f"{r['sdpa_tbps']:>5.2f} {r['vs_sdpa']:>6.2f}x {r['of_copy']:>6.0%} {r['run_host_us']:>8.1f} "
              f"{r['oneshot_host_us']:>9.1f}" + "".join(f" {x:>9.2f}x" for x in r["variants"].values()), flush=True)
    plan_us = plan_host_us()
    print(f"host time of plan_decode for 1024 sequences: {plan_us:.1f} us")
    if json_path:
        Path(json_path).write_text(json.dumps({"device": device_name(), "copy_tbps": copy / 1e12, "rows": rows,
                                               "plan_1024_host_us": plan_us}, indent=2))


# ---- script mode: one table ---------------------------------------------------------------------
def main() -> None:
    if "--tune" in sys.argv:
        return tune_decode()
    if "--matrix" in sys.argv:
        paths = [a for a in sys.argv[1:] if not a.startswith("--")]
        return run_matrix("--quick" in sys.argv, paths[0] if paths else None,
                          MATRIX_VARIANTS if "--variants" in sys.argv else None)
    copy = device_copy_bandwidth()
    print(f"# {device_name()}; device copy {copy / 1e12:.2f} TB/s (read + write)")
    print("# us: CUDA-event median of 1 call (host launch cost included) / of 10 back-to-back calls")
    print(f"{'shape':>10} {'impl':>20} {'us x1':>8} {'us x10':>8} {'TB/s':>6} {'of copy':>8} {'vs sdpa':>8}")
    for num_seqs, ctx in DECODE_SHAPES if "--prefill" not in sys.argv else ():
        case = make_case(num_seqs, ctx)
        sdpa, want = sdpa_decode(case, num_seqs, ctx)
        base = _row(f"{num_seqs}x{ctx}", "torch sdpa", sdpa, case.kv_bytes, copy, None)
        for name, run in decode_variants(case, sweep="--sweep" in sys.argv).items():
            check_close(name, run(), want)
            _row(f"{num_seqs}x{ctx}", name, run, case.kv_bytes, copy, base)
        if (num_seqs, ctx) == DECODE_SHAPES[-1]:
            print_host_costs(case)
        del case, sdpa, want
    num_seqs, seq_len = PREFILL_SHAPE
    case = make_case(num_seqs, seq_len, num_new=seq_len)
    sdpa, want = sdpa_prefill(case, num_seqs, seq_len)
    flops = 4 * num_seqs * HQ * D * seq_len * (seq_len + 1) // 2   # causal QK^T and PV
    base = cuda_event_time_ms(sdpa, iters=10)
    print(f"prefill {num_seqs}x{seq_len}: torch sdpa {base * 1e3:.0f} us ({flops / base / 1e9:.0f} TFLOP/s)")
    impls = dict(PREFILL_IMPLS)
    if "--tune-prefill" in sys.argv:
        from pagemem.kernels.prefill_flash import Tiling
        for t in PREFILL_TILINGS:
            impls[tiling_name(t)] = ("flash", Tiling(*t))
    for name, (path, tiling) in impls.items():
        run = prefill_run(case, seq_len, path, tiling)
        check_close(name, run(), want, tol=1e-2)
        ours = cuda_event_time_ms(run, iters=10)
        print(f"prefill {num_seqs}x{seq_len}: {name:>14} {ours * 1e3:6.0f} us ({flops / ours / 1e9:.0f} TFLOP/s), "
              f"{base / ours:.2f}x of sdpa throughput", flush=True)
    print("cuBLAS route stages (ms):", profile_prefill(prefill_run(case, seq_len, "gemm")))


# block tilings swept by --tune-prefill: (warps, m_tiles, block_n, q_regs, min_blocks, pack, sub_n, stages)
PREFILL_TILINGS = [(4, 1, 64, True), (8, 1, 64, True, 1, True), (4, 2, 64, False, 1, True),
                   (4, 2, 64, False, 1, True, 32), (4, 2, 32, False, 1, True), (8, 2, 32, False, 1, True),
                   (4, 2, 32, False, 1, True, 0, 3), (8, 1, 32, False, 2, True)]


def tiling_name(t) -> str:
    from pagemem.kernels.prefill_flash import Tiling
    t = Tiling(*t)
    return (f"w{t.warps}m{t.m_tiles}n{t.block_n}{'q' if t.q_regs else ''}b{t.min_blocks}"
            f"{'p' if t.pack else ''}{'s%d' % t.sub_n if t.sub_n else ''}x{t.stages}")


def _row(shape, name, run, nbytes, copy, base_ms):
    one = cuda_event_time_ms(run)
    ms = cuda_event_time_ms(lambda: [run() for _ in range(10)], iters=10) / 10
    bw = nbytes / (ms * 1e-3)
    ratio = f"{base_ms / ms:7.2f}x" if base_ms else "       -"
    print(f"{shape:>10} {name:>20} {one * 1e3:8.1f} {ms * 1e3:8.1f} {bw / 1e12:6.2f} {bw / copy:8.0%} {ratio}", flush=True)
    return ms


def print_host_costs(case: Case) -> None:
    """Host cost of one paged_decode (split-K: two launches), relaunching through CuPy or Numba."""
    import pagemem.kernels._arrays as dev
    for raw in (True, False):
        dev.RAW_LAUNCH, saved = raw, dev.RAW_LAUNCH
        dev._compiled.clear()
        us = host_us_per_call(decode_variants(case)["v2"])
        dev.RAW_LAUNCH = saved
        dev._compiled.clear()
        print(f"host time per paged_decode call, {'CuPy' if raw else 'Numba'} relaunch: {us:.1f} us")


def host_us_per_call(run, calls: int = 200) -> float:
    """Host-side cost of enqueuing one call (the GPU queue absorbs the launches)."""
    import time
    import cupy as cp
    run()
    cp.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    t1 = time.perf_counter()
    cp.cuda.get_current_stream().synchronize()
    return (t1 - t0) / calls * 1e6


def profile_prefill(run) -> dict:
    """Event time of each launch and GEMM inside one paged_prefill call, by stage."""
    import cupy as cp
    import pagemem.kernels.prefill as pf
    times, events = {}, []
    real_launch, real_mm = pf.launch, pf.matmul

    def timed(name, fn, *a):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        r = fn(*a)
        e1.record()
        events.append((name, e0, e1))
        return r
    pf.launch = lambda k, *a: timed(k.py_func.__name__, real_launch, k, *a)
    pf.matmul = lambda *a: timed("matmul", real_mm, *a)
    try:
        run()
    finally:
        pf.launch, pf.matmul = real_launch, real_mm
    events[-1][2].synchronize()
    for name, e0, e1 in events:
        times[name] = round(times.get(name, 0) + cp.cuda.get_elapsed_time(e0, e1), 3)
    return times


if __name__ == "__main__":
    main()
