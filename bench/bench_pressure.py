"""Memory pressure: the end-to-end benchmark's model and request mix on pools too small for them.

bench_e2e's workload (1000 requests, prompts 32..1024 and outputs 32..512 tokens, greedy, EOS
ignored) and model (random weights of Llama-3.2-1B's shape in fp16, initialized by transformers
and saved, as bench_e2e's ``checkpoint`` does) under bench_e2e's ENGINE settings, served in one run:

    roomy        a pool big enough for the peak demand (ENGINE's 80,000 pages): no preemption
    2x, 4x       pools of 1/2 and 1/4 of the roomy run's peak pages, each under preemption
                 "swap", "recompute" and "auto" (host swap sized to hold the overflow)

Every engine starts as a server does (``LLM.warmup``: kernels compiled, decode graphs captured,
and ``LLM.measure_costs``: prefill tokens/s and PCIe bandwidth each way measured on it, which feed
"auto"'s cost model). Per run: output tokens/s, TTFT and TPOT p50/p99, preemptions by mode (a
demoted swap counts as a recompute), pages and GB swapped each way, prefill tokens recomputed (the
run's prefill tokens less the roomy run's, which prefills each prompt once) and their GPU time at
the start-up prefill rate, the host's seconds blocked on swaps (HostSwap.wait_s) and the swap
copies' device seconds each way (the compute stream waits on a step's copies), and whether every
request completed with the roomy run's tokens. The check: at 4x all three modes complete every
request with the roomy run's outputs (exit status 1 otherwise); auto against the better of swap
and recompute is reported.

Run on a GPU:   python bench/bench_pressure.py [--quick] [--json pressure.json]
CPU smoke test: python bench/bench_pressure.py --device cpu   (random:tiny, 24 small requests)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script; last, so installed packages win
from bench._harness import device_name, has_cuda  # noqa: E402

MODES = ("swap", "recompute", "auto")
PRESSURES = (2, 4)
CHECKED_PRESSURE = 4
# The CPU smoke test: random:tiny, bench_e2e's draws at a tiny scale, a small engine.
CPU_MIX = dict(n=24, in_lens=(4, 40), out_lens=(2, 24), vocab=250)
CPU_ENGINE = dict(page_size=4, max_num_seqs=8, max_num_batched_tokens=64)


def uniform_workload(n: int, in_lens: tuple[int, int], out_lens: tuple[int, int], vocab: int, seed: int = 0):
    """bench_e2e.workload's draws over other ranges: lengths uniform in each closed range."""
    rng = np.random.default_rng(seed)
    ins, outs = rng.integers(in_lens[0], in_lens[1] + 1, n), rng.integers(out_lens[0], out_lens[1] + 1, n)
    return [rng.integers(0, vocab, k).tolist() for k in ins], outs.tolist()


def hf_checkpoint(path: Path, preset: str) -> Path:
    """Random weights of ``preset``'s shape in fp16, initialized on the GPU by transformers and
    saved, as bench_e2e's ``checkpoint`` fixture makes them (the model is freed afterwards)."""
    import torch
    import transformers
    from pagemem.models.presets import PRESETS
    cfg = transformers.LlamaConfig(**{k: v for k, v in PRESETS[preset].items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    hf.save_pretrained(path)
    del hf
    torch.cuda.empty_cache()
    return path


def setup(args) -> tuple:
    """(model, prompts, output lengths, engine settings, roomy pool pages) for the device."""
    from pagemem.models import load_model
    if args.device == "cpu":
        prompts, outs = uniform_workload(**CPU_MIX)
        model = load_model(args.model or "random:tiny", device="cpu", seed=0)
        ps = CPU_ENGINE["page_size"]
        roomy = sum(-(-(len(p) + o) // ps) for p, o in zip(prompts, outs)) + 1
        return model, prompts, outs, dict(CPU_ENGINE), roomy
    from bench.bench_e2e import ENGINE, PRESET, workload
    prompts, outs = workload(args.num_requests or (300 if args.quick else 1000))
    path = args.model or hf_checkpoint(Path(tempfile.mkdtemp(prefix="pressure-")), PRESET)
    model = load_model(str(path), dtype=ENGINE["dtype"], device="cuda")
    settings = {k: v for k, v in ENGINE.items() if k not in ("num_pages", "preemption", "swap_space", "dtype")}
    return model, prompts, outs, settings, ENGINE["num_pages"]


def serve(model, prompts, outs, num_pages: int, mode: str, swap_gib: float, settings: dict) -> tuple[dict, list]:
    """One engine, started as a server would be, serving the workload; (figures, token ids)."""
    from pagemem.models import SamplingParams
    from pagemem.models.engine import LLM
    from pagemem.models.summary import summarize
    t0 = time.perf_counter()
    llm = LLM(model, num_pages=num_pages, preemption=mode, swap_space=swap_gib, **settings)
    llm.warmup(max(map(len, prompts)) + max(outs))       # GPU: compiles, captures, measure_costs()
    if llm.scheduler.preemptor.prefill_tokens_per_s is None:
        llm.measure_costs()                                 # the CPU's warmup does nothing
    sw = llm.swap
    startup = {"startup_s": time.perf_counter() - t0,
               "startup_prefill_tokens_per_s": llm.scheduler.preemptor.prefill_tokens_per_s,
               "startup_pcie_out_gb_per_s": sw.bandwidth("out") / 1e9, "startup_pcie_in_gb_per_s": sw.bandwidth("in") / 1e9}
    before = (sw.wait_s, dict(sw.copy_s), dict(sw.num_calls))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
    results = llm.generate(prompts, params)
    fig = summarize(llm, results)
    fig.update(startup, mode=mode, swap_wait_s=sw.wait_s - before[0],
               swap_copy_out_s=sw.copy_s["out"] - before[1]["out"], swap_copy_in_s=sw.copy_s["in"] - before[1]["in"],
               swap_calls_out=sw.num_calls["out"] - before[2]["out"], swap_calls_in=sw.num_calls["in"] - before[2]["in"],
               completed=sum(len(r.token_ids) == n for r, n in zip(results, outs)))
    tokens = [r.token_ids for r in results]
    del llm, results
    _free_device_memory(model)
    return fig, tokens


def _free_device_memory(model) -> None:
    gc.collect()
    if model.device == "cuda":
        import cupy as cp
        cp.get_default_memory_pool().free_all_blocks()


def run_all(args) -> dict:
    model, prompts, outs, settings, roomy_pages = setup(args)
    page_bytes = model.pool_config(2, settings.get("page_size", 16)).page_bytes
    largest = max(-(-(len(p) + o) // settings.get("page_size", 16)) for p, o in zip(prompts, outs))
    rows, ref = {}, None
    rows["roomy"], ref = serve(model, prompts, outs, roomy_pages, "swap", 4.0 if args.device == "cuda" else 0.01, settings)
    peak = rows["roomy"]["peak_pages_used"]
    swap_gib = max(1.1 * peak * page_bytes / 2**30, 2 * page_bytes / 2**30)   # room for the whole overflow
    for pressure in PRESSURES:
        pages = max(-(-peak // pressure), largest + 1) + 1
        for mode in MODES:
            fig, tokens = serve(model, prompts, outs, pages, mode, swap_gib, settings)
            fig["pressure"] = pressure
            fig["num_different_outputs"] = sum(a != b for a, b in zip(tokens, ref))
            fig["first_divergences"] = _divergences(tokens, ref)
            rows[f"{pressure}x {mode}"] = fig
    rows["roomy"].update(pressure=1, num_different_outputs=0)
    for fig in rows.values():
        fig["recomputed_tokens"] = fig["prefill_tokens"] - rows["roomy"]["prefill_tokens"]
        fig["recompute_gpu_s"] = fig["recomputed_tokens"] / fig["startup_prefill_tokens_per_s"]
    return {"device": device_name() if args.device == "cuda" else "CPU", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "model": args.model or ("random:tiny" if args.device == "cpu" else "bench_e2e checkpoint"),
            "num_requests": len(prompts), "settings": settings, "roomy_peak_pages": peak, "rows": rows,
            "check": check(rows, len(prompts))}


def _divergences(tokens: list, ref: list, limit: int = 10) -> list[tuple[int, int]]:
    """(request, first output position that differs) for up to ``limit`` requests."""
    out = []
    for i, (a, b) in enumerate(zip(tokens, ref)):
        if a != b:
            out.append((i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))))
            if len(out) == limit:
                break
    return out


def check(rows: dict, n: int) -> dict:
    """At CHECKED_PRESSURE every mode completed every request with the roomy run's tokens; auto's
    throughput against the better of swap and recompute at each pressure."""
    at = [f"{CHECKED_PRESSURE}x {m}" for m in MODES]
    ok = all(rows[k]["completed"] == n and rows[k]["num_different_outputs"] == 0 for k in at)
    auto = {p: rows[f"{p}x auto"]["output_tokens_per_s"] / max(rows[f"{p}x {m}"]["output_tokens_per_s"]
                                                                 for m in ("swap", "recompute")) for p in PRESSURES}
    return {"identical_outputs_at_4x": ok, "auto_vs_best": auto}


def table(result: dict) -> str:
    head = ("run", "pool", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "preempt s/r (dem)",
            "pages out/in", "GB out/in", "recomp tok", "recomp GPU s", "swap wait s", "copy s out/in", "same")
    lines = [" | ".join(head)]
    for name, f in result["rows"].items():
        lines.append(" | ".join((
            name, str(f["pool_pages"]), f"{f['output_tokens_per_s']:,.0f}",
            f"{f['ttft_p50_ms']:.1f}/{f['ttft_p99_ms']:.1f}", _pair(f["tpot_p50_ms"], f["tpot_p99_ms"]),
            f"{f['preemptions_swap']}/{f['preemptions_recompute']} ({f['demotions']})",
            f"{f['pages_swapped_out']}/{f['pages_swapped_in']}",
            f"{f['bytes_swapped_out'] / 1e9:.3f}/{f['bytes_swapped_in'] / 1e9:.3f}",
            str(f["recomputed_tokens"]), f"{f['recompute_gpu_s']:.3f}", f"{f['swap_wait_s']:.4f}",
            f"{f['swap_copy_out_s']:.3f}/{f['swap_copy_in_s']:.3f}",
            "yes" if f["num_different_outputs"] == 0 and f["completed"] == result["num_requests"] else
            f"{f['num_different_outputs']} differ, {f['completed']} done")))
    starts = {k: f"{f['startup_prefill_tokens_per_s']:,.0f} tok/s, PCIe {f['startup_pcie_out_gb_per_s']:.1f}/"
                 f"{f['startup_pcie_in_gb_per_s']:.1f} GB/s" for k, f in result["rows"].items()}
    c = result["check"]
    lines.append("start-up figures (auto's cost model): " + "; ".join(f"{k}: {v}" for k, v in starts.items()))
    lines.append(f"every request at {CHECKED_PRESSURE}x with the roomy run's outputs: "
                 f"{'yes' if c['identical_outputs_at_4x'] else 'NO'}; auto / best of swap and recompute: "
                 + ", ".join(f"{p}x {v:.3f}" for p, v in c["auto_vs_best"].items()))
    return "\n".join(lines)


def _pair(a, b) -> str:
    return "n/a" if a is None else f"{a:.2f}/{b:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if has_cuda() else "cpu")
    p.add_argument("--model", default=None, help="a checkpoint folder or random:<preset> (default: bench_e2e's "
                                                   "checkpoint on cuda, random:tiny on the CPU)")
    p.add_argument("--num-requests", type=int, default=None, help="cuda: default 1000 (300 with --quick)")
    p.add_argument("--quick", action="store_true", help="cuda: 300 requests")
    p.add_argument("--json", type=Path, default=Path("pressure.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_all(args)
    print(f"\n{result['device']}  {result['date']}  {result['model']}, {result['num_requests']} requests, "
          f"roomy peak {result['roomy_peak_pages']} pages")
    print(table(result))
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"written to {args.json}")
    return 0 if result["check"]["identical_outputs_at_4x"] else 1


if __name__ == "__main__":
    sys.exit(main())
