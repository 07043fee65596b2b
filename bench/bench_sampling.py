"""Sampling time per step: pagemem.kernels.sample against a torch peer on the same logits, same run.

Rows 1, 64, 256, 1024 x a 128256-token vocabulary (Llama 3's), fp16 and fp32 logits, for greedy,
temperature 1.0, and temperature 0.7 + top-k 50 + top-p 0.9. The peer is what a PyTorch engine
runs: greedy ``argmax``; temperature alone ``softmax`` + ``torch.multinomial``; with filters the
sort-based path (``torch.sort``, top-k mask, ``softmax``, ``cumsum`` top-p mask, ``multinomial``;
vLLM's fallback when FlashInfer is absent). Logits are N(0, 3^2): a spread like a real model's,
with a few hundred tokens inside top-p 0.9 at temperature 0.7.

    python bench/bench_sampling.py [out.json]       (table on stdout)
    pytest bench/bench_sampling.py --benchmark-only (the same calls through pytest-benchmark)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script; last, so installed packages win
from bench._harness import cuda_event_time_ms, device_name, requires_cuda  # noqa: E402

V = 128256
ROWS = (1, 64, 256, 1024)
DTYPES = ("float16", "float32")
SETTINGS = {"greedy": (0.0, 0, 1.0), "t1.0": (1.0, 0, 1.0), "t0.7_k50_p0.9": (0.7, 50, 0.9)}
pytestmark = [requires_cuda, pytest.mark.gpu]


def make_case(rows: int, dtype: str, setting: str, seed: int = 0):
    """(logits cupy [rows, V], params cupy [NUM_FIELDS, rows], settings tuple)."""
    import cupy as cp
    from pagemem.kernels import pack_sampling_params
    rng = cp.random.default_rng(seed)
    logits = (rng.standard_normal((rows, V), dtype=cp.float32) * 3).astype(dtype)
    t, k, p = SETTINGS[setting]
    params = pack_sampling_params([t] * rows, [k] * rows, [p] * rows, [0.0] * rows, range(rows), [100] * rows)
    return logits, cp.asarray(params), (t, k, p)


def torch_sample(logits, t: float, k: int, p: float):
    import torch
    if t == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / t
    if k == 0 and p >= 1.0:
        return torch.multinomial(torch.softmax(z, dim=-1), 1)
    z, idx = torch.sort(z, dim=-1, descending=True)
    if k:
        z[:, k:] = float("-inf")
    probs = torch.softmax(z, dim=-1)
    if p < 1.0:
        drop = probs.cumsum(dim=-1) - probs > p
        z = z.masked_fill(drop, float("-inf"))
        probs = torch.softmax(z, dim=-1)
    return idx.gather(-1, torch.multinomial(probs, 1))


def check(logits, params, out) -> None:
    """Correct before fast: greedy rows are the argmax; sampled rows lie in the kept set."""
    from pagemem.kernels.reference_sampling import ref_sampling_probs
    x = logits[:4].get().astype(np.float32)
    probs = ref_sampling_probs(x, params[:, :4].get())
    got = out[:4].get()
    assert (probs[np.arange(len(got)), got] > 0).all(), got


def measure(rows: int, dtype: str, setting: str) -> dict:
    import cupy as cp
    import torch
    from pagemem import kernels
    logits, params, (t, k, p) = make_case(rows, dtype, setting)
    out = cp.empty(rows, cp.int32)
    run = lambda: kernels.sample(logits, params, out=out)              # noqa: E731
    run()
    check(logits, params, out)
    ours_ms = cuda_event_time_ms(run, iters=20, warmup=3)
    cp.cuda.get_current_stream().synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    host_us = (time.perf_counter() - t0) / n * 1e6
    cp.cuda.get_current_stream().synchronize()
    tl = torch.as_tensor(logits, device="cuda")
    torch_sample(tl, t, k, p)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        torch_sample(tl, t, k, p)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    torch_ms = float(np.median(times))
    return dict(rows=rows, dtype=dtype, setting=setting, ours_us=ours_ms * 1e3, torch_us=torch_ms * 1e3,
                speedup=torch_ms / ours_ms, host_us=host_us)


@pytest.mark.benchmark(group="sampling")
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("rows", [1, 256])
def test_sample(benchmark, rows, setting):
    import cupy as cp
    from pagemem import kernels
    logits, params, _ = make_case(rows, "float32", setting)
    out = cp.empty(rows, cp.int32)
    kernels.sample(logits, params, out=out)
    check(logits, params, out)
    stream = cp.cuda.get_current_stream()

    def timed():
        kernels.sample(logits, params, out=out)
        stream.synchronize()
    benchmark.pedantic(timed, rounds=30, warmup_rounds=3)


def main() -> None:
    results = [measure(r, d, s) for s in SETTINGS for d in DTYPES for r in ROWS]
    print(f"{device_name()}, vocab {V}; device time per call (CUDA events, median of 20), host us per call")
    print(f"{'setting':>15} {'dtype':>8} {'rows':>5} {'pagemem us':>11} {'torch us':>10} {'torch/ours':>10} {'host us':>8}")
    for r in results:
        print(f"{r['setting']:>15} {r['dtype']:>8} {r['rows']:>5} {r['ours_us']:>11.1f} {r['torch_us']:>10.1f} "
              f"{r['speedup']:>10.2f} {r['host_us']:>8.1f}")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"device": device_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
