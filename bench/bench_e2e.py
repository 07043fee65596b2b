"""End to end: pagemem's LLM engine against HF transformers ``generate`` on the same weights,
the same seeded requests and the same GPU, in one run.

Workload: 1000 requests, input lengths 32..1024, output lengths 32..512 (uniform, seed 0),
random weights with Llama-3.2-1B's shape in fp16, saved by transformers and loaded by pagemem.
HF runs static batches of 32, 64 and 128 (left padding; each batch runs to its longest
output; only requested tokens count). HF is timed on the first two batches of each size
(its throughput per batch barely varies, and a full pass takes tens of minutes); pagemem
serves all 1000 requests.

Run on a GPU:  pytest bench/bench_e2e.py --benchmark-only -s
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from bench._harness import cuda_event_time_ms, device_copy_bandwidth, device_name, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_REQUESTS = int(os.environ.get("PAGEMEM_E2E_REQUESTS", 1000))
# The engine's settings in this benchmark (bench/profile_engine.py uses them too). max_num_seqs and
# the token budget are vLLM's defaults for LLM() on a GPU of 70 GiB or more (get_batch_defaults in
# vllm/engine/arg_utils.py: 1024 sequences, 16384 tokens); PAGEMEM_E2E_SEQS overrides the first.
ENGINE = dict(dtype="float16", num_pages=80_000, swap_space=4.0, preemption="swap", admit_batch=32,
              max_num_seqs=int(os.environ.get("PAGEMEM_E2E_SEQS", 1024)), max_num_batched_tokens=16384)
PRESET = "llama-3.2-1b"
RESULTS: dict[str, float] = {}
# Sampling settings: greedy; temperature 1.0 with top-p 1.0 (vLLM's throughput benchmark); a
# typical chat setting. HF_BATCHES: static batch sizes HF runs (its best was 128 on the H100 and H200).
SAMPLING = {"greedy": dict(temperature=0.0), "t1.0": dict(temperature=1.0, top_p=1.0),
            "chat": dict(temperature=0.7, top_p=0.9, top_k=50)}
HF_BATCHES = [int(b) for b in os.environ.get("PAGEMEM_E2E_HF_BATCHES", "32,64,128").split(",")]
HF_SAMPLING = os.environ.get("PAGEMEM_E2E_HF_SAMPLING", "greedy,t1.0,chat").split(",")


def workload(n: int = NUM_REQUESTS, seed: int = 0, vocab: int = 32_000):
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(32, 1025, n)
    out_lens = rng.integers(32, 513, n)
    prompts = [rng.integers(0, vocab, k).tolist() for k in in_lens]
    return prompts, out_lens.tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random Llama-3.2-1B-shaped weights in fp16, initialized on the GPU by transformers and saved."""
    from pagemem.models.presets import PRESETS
    cfg = transformers.LlamaConfig(**{k: v for k, v in PRESETS[PRESET].items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    path = tmp_path_factory.mktemp("llama1b")
    hf.save_pretrained(path)
    return path, hf


def _hf_cases():
    """(batch, sampling): every batch size greedy, the largest with each other setting."""
    cases = [(b, "greedy") for b in HF_BATCHES if "greedy" in HF_SAMPLING]
    return cases + [(max(HF_BATCHES), s) for s in HF_SAMPLING if s != "greedy"]


@pytest.mark.benchmark(group="e2e")
@pytest.mark.parametrize("batch_size, sampling", _hf_cases())
def test_hf_generate(benchmark, checkpoint, batch_size, sampling):
    _, hf = checkpoint
    prompts, out_lens = workload()
    batches = [range(i, i + batch_size) for i in (0, batch_size)]

    def run_batches():
        tokens = 0
        for idx in batches:
            tokens += _hf_batch(hf, [prompts[i] for i in idx], [out_lens[i] for i in idx], SAMPLING[sampling])
        return tokens

    _hf_batch(hf, prompts[:2], [4, 4])                     # warm-up: CUDA context, kernels
    t0 = time.perf_counter()
    tokens = benchmark.pedantic(run_batches, rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    RESULTS[f"hf_{sampling}_{batch_size}"] = tokens / seconds
    benchmark.extra_info.update(requested_tokens=tokens, tokens_per_s=tokens / seconds, device=device_name(),
                                sampling=sampling)
    print(f"\nHF generate batch {batch_size} {sampling}: {tokens / seconds:.0f} tok/s")


def _hf_batch(hf, prompts: list[list[int]], out_lens: list[int], sampling=None) -> int:
    """Generate each prompt's requested tokens in one left-padded static batch; returns their count."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device="cuda")
        mask[i, width - len(p):] = 1
    n = max(out_lens)
    with torch.inference_mode():
        s = sampling or {"temperature": 0.0}
        kw = dict(do_sample=False) if s["temperature"] == 0 else \
            dict(do_sample=True, temperature=s["temperature"], top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0))
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
    torch.cuda.synchronize()
    return sum(out_lens)


@pytest.fixture(scope="module")
def engine(checkpoint):
    from pagemem.models.engine import LLM
    path, _ = checkpoint
    llm = LLM(str(path), device="cuda", **ENGINE)
    from pagemem.models import SamplingParams
    llm.generate([[1] * 40, [2] * 300], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # compile
    llm.warmup(1024 + 512)          # start-up: compile prefill kernels, capture every decode graph
    return llm


@pytest.mark.benchmark(group="e2e")
@pytest.mark.parametrize("async_scheduling, sampling", [(True, "greedy"), (False, "greedy"), (True, "t1.0"),
                                                        (True, "chat")], ids=["async", "sync", "async-t1.0", "async-chat"])
def test_pagemem_engine(benchmark, engine, async_scheduling, sampling):
    """The engine as configured (async scheduling: sampled ids stay on the device and the next
    step is queued before they reach the host), the same engine taking the ids in every step,
    and the engine sampling with a temperature (drawn on the device, inside the decode graphs)."""
    from pagemem.models import SamplingParams
    engine.async_scheduling = async_scheduling
    prompts, out_lens = workload()
    params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **SAMPLING[sampling]) for i, n in enumerate(out_lens)]
    t0 = time.perf_counter()
    outs = benchmark.pedantic(engine.generate, args=(prompts, params), rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    assert tokens == sum(out_lens)
    tps = tokens / seconds
    RESULTS[f"pagemem_{sampling}_{'async' if async_scheduling else 'sync'}"] = tps
    hf_best = max((v for k, v in RESULTS.items() if k.startswith(f"hf_{sampling}_")), default=None)
    greedy = RESULTS.get("pagemem_greedy_async")
    benchmark.extra_info.update(requested_tokens=tokens, tokens_per_s=tps, device=device_name(), sampling=sampling,
                                hf_best_tokens_per_s=hf_best, speedup=tps / hf_best if hf_best else None,
                                vs_greedy=tps / greedy if greedy else None,
                                preemptions=dict(engine.scheduler.num_preemptions))
    engine.async_scheduling = True
    print(f"\npagemem ({'async' if async_scheduling else 'sync'}, {sampling}) {tps:.0f} tok/s; HF best "
          f"{hf_best or 0:.0f} tok/s; speedup {tps / hf_best if hf_best else float('nan'):.1f}x; "
          f"{tps / greedy if greedy else float('nan'):.2f}x greedy; {dict(engine.scheduler.num_preemptions)}")


@pytest.mark.benchmark(group="decode-step")
@pytest.mark.parametrize("sampling", ["greedy", "chat"])
@pytest.mark.parametrize("context_len", [512])
def test_decode_step_b256(benchmark, engine, context_len, sampling):
    """One decode step of 256 sequences as the engine runs it (CUDA-graph replay, inputs uploaded,
    tokens drawn inside the graph), and the eager forward, against weights + K/V bytes over the
    copy bandwidth measured in this run; greedy, then temperature 0.7 + top-k 50 + top-p 0.9."""
    import cupy as cp
    from pagemem import SeqPages, pack_batch
    llm = engine
    seqs = [SeqPages(llm.pool) for _ in range(256)]
    for s in seqs:
        s.append(context_len)
    pages = [p for s in seqs for p in s.page_table]
    for i in range(0, len(pages), 1024):                    # random K/V, never zeros; 1024 pages at a time
        idx = cp.asarray(pages[i:i + 1024])
        shape = (len(idx), *llm.pool.kv.shape[1:])
        llm.pool.kv[idx] = (cp.random.standard_normal(shape, dtype=cp.float32) * 0.1).astype(cp.float16)
    tokens = np.arange(256, dtype=np.int32)
    positions = np.full(256, context_len - 1, dtype=np.int32)
    stream = llm.stream
    from pagemem.models import SamplingParams
    from pagemem.models.sampling import pack_rows
    sp = SamplingParams(**SAMPLING[sampling])
    packed = pack_rows([sp] * 256, list(range(256)), [context_len] * 256)

    def step():                                            # the engine's decode path: graph replay
        llm.graphs.run(tokens, positions, seqs, None, packed)
        stream.synchronize()

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=20, iterations=1)
    batch = pack_batch(seqs, [1] * 256, cp)
    with stream:
        eager_ms = cuda_event_time_ms(lambda: llm.model.forward(tokens, positions, batch, llm.pool), stream=stream)
    # every weight is read once per step (a tied LM head counts once; embedding rows are negligible)
    weight_bytes = sum({int(w.data.ptr): int(w.nbytes) for w in llm.model.weights.values()}.values())
    c = llm.model.config
    kv_bytes = 256 * context_len * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    floor_s = (weight_bytes + kv_bytes) / device_copy_bandwidth()
    mean = benchmark.stats.stats.mean
    RESULTS[f"step_{sampling}"] = mean
    greedy = RESULTS.get("step_greedy")
    benchmark.extra_info.update(weight_bytes=weight_bytes, kv_bytes=kv_bytes, floor_ms=floor_s * 1e3,
                                step_ms=mean * 1e3, floor_fraction=floor_s / mean, eager_ms=eager_ms,
                                vs_greedy_step=mean / greedy if greedy else None)
    print(f"\ndecode step b256 ctx{context_len} {sampling}: graph {mean * 1e3:.2f} ms, eager {eager_ms:.2f} ms, "
          f"floor {floor_s * 1e3:.2f} ms (graph at {100 * floor_s / mean:.0f}% of floor speed); "
          f"{mean / greedy if greedy else float('nan'):.3f}x the greedy step")
    for s in seqs:
        s.free()
