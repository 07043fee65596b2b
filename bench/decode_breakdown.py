"""Where a batch-256 decode step of random:llama-3.2-1b spends its GPU time (CUDA events).

    python bench/decode_breakdown.py [context_len]        (default 512)

Prints the graph replay, the eager forward, and the step's parts timed alone: the 16 layers'
decode attention, every GEMM of the step, and the LM head. Floor = (weights + K/V bytes) over
the device copy bandwidth measured here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script; last, so installed packages win
from bench._harness import cuda_event_time_ms, device_copy_bandwidth
from pagemem.models.engine import LLM
from pagemem import SeqPages, kernels, pack_batch


def main() -> None:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    llm = LLM("random:llama-3.2-1b", dtype="float16", num_pages=256 * (ctx // 16 + 1) + 64, swap_space=0)
    c, pool, stream = llm.model.config, llm.pool, llm.stream
    seqs = [SeqPages(pool) for _ in range(256)]
    for s in seqs:
        s.append(ctx)
    pool.kv[1:] = 0.1
    tokens = np.arange(256, dtype=np.int32)
    positions = np.full(256, ctx - 1, dtype=np.int32)
    batch = pack_batch(seqs, [1] * 256, cp)
    with stream:
        rows = {}
        rows["graph replay (fill + upload + launch)"] = cuda_event_time_ms(
            lambda: llm.graphs.run(tokens, positions, seqs), stream=stream)
        rows["eager forward"] = cuda_event_time_ms(lambda: llm.model.forward(tokens, positions, batch, pool),
                                                   stream=stream)
        q = cp.random.standard_normal((256, c.num_heads, c.head_dim), dtype=cp.float32).astype(cp.float16)
        k, v = pool.layer_kv(0)
        rows["decode attention x16 layers"] = 16 * cuda_event_time_ms(
            lambda: kernels.paged_decode(q, k, v, batch.page_tables, batch.context_lens), stream=stream)
        w = llm.model.weights
        x = cp.random.standard_normal((256, c.hidden_size), dtype=cp.float32).astype(cp.float16)
        gemm = llm.graphs.gemm
        names = [n for n in w if n.endswith(("qkv.weight", "o.weight", "gate_up.weight"))]
        mats = [w[n] for n in names]
        downs = [w[n] for n in w if n.endswith("down.weight")]
        h = cp.random.standard_normal((256, c.intermediate_size), dtype=cp.float32).astype(cp.float16)
        xo = cp.random.standard_normal((256, c.num_heads * c.head_dim), dtype=cp.float32).astype(cp.float16)

        def all_gemms():
            for n, m in zip(names, mats):
                gemm(xo if n.endswith("o.weight") else x, m)
            for m in downs:
                gemm(h, m)
        rows["layer GEMMs (qkv, o, gate_up, down) x16"] = cuda_event_time_ms(all_gemms, stream=stream)
        rows["LM head GEMM"] = cuda_event_time_ms(lambda: gemm(x, w["lm_head.weight"]), stream=stream)
    weight_bytes = sum({int(a.data.ptr): int(a.nbytes) for a in w.values()}.values())   # tied head once
    kv_bytes = 256 * ctx * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    floor = (weight_bytes + kv_bytes) / device_copy_bandwidth() * 1e3
    print(f"batch 256, context {ctx}: weights {weight_bytes / 1e9:.2f} GB, K/V {kv_bytes / 1e9:.2f} GB, "
          f"floor {floor:.2f} ms")
    for name, ms in rows.items():
        print(f"{name:<42} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
