"""Does the simulator predict the engine? On a GPU: calibrate the step model, then serve two
workloads with the real engine and replay the same requests through the simulator, and compare
output tokens/s and p50 TPOT (the target: within 15%).

Workloads (the same ShareGPT-like requests, all arriving at once, greedy, ignore_eos):
    roomy     a pool holding every request at once: no preemption
    pressure  a pool of a quarter of the roomy run's peak pages (4x memory pressure)

Run on a GPU:  python bench/validate_simulator.py [--step-model step_model.json] [--json out.json]
(without --step-model it runs ``pagemem calibrate`` first and writes step_model.json beside --json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pagemem.models import SamplingParams, load_model
from pagemem.models.cli import build_parser
from pagemem.models.engine import LLM
from pagemem.models.summary import summarize, summarize_simulation
from pagemem.simulator import SimConfig, Simulator, StepModel
from pagemem.traces import PromptSource, synthetic_trace

TARGET = 0.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.2-1b")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    p.add_argument("--dataset", choices=["sharegpt", "alpaca"], default="sharegpt")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--preemption", choices=["swap", "recompute", "auto"], default="swap")
    p.add_argument("--swap-space", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-model", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("validate_simulator.json"))
    return p.parse_args(argv)


def step_model(args) -> StepModel:
    if args.step_model is not None:
        return StepModel.load(args.step_model)
    out = args.json.with_name("step_model.json")
    cal = build_parser().parse_args(["calibrate", "--model", args.model, "--dtype", args.dtype, "--device", args.device,
                                     "--page-size", str(args.page_size), "--out", str(out)])
    return cal.func(cal)


def engine_run(model, trace, prompts, num_pages: int, args) -> dict:
    llm = LLM(model, page_size=args.page_size, num_pages=num_pages, swap_space=args.swap_space,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              preemption=args.preemption, seed=args.seed)
    llm.warmup(max(r.prompt_len + r.output_len for r in trace))
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in trace]
    return summarize(llm, llm.generate(prompts, params))


def simulated_run(model: StepModel, trace, prompts, num_pages: int, args) -> dict:
    config = SimConfig(num_pages, args.page_size, args.max_num_seqs, args.max_num_batched_tokens, args.preemption,
                       swap_space=args.swap_space)
    return summarize_simulation(Simulator(trace, model, config, prompts=prompts).run(), model=args.model)


def compare(name: str, measured: dict, predicted: dict) -> dict:
    row = {"workload": name, "pool_pages": measured["pool_pages"],
           "preemptions": measured["preemptions_swap"] + measured["preemptions_recompute"],
           "predicted_preemptions": predicted["preemptions_swap"] + predicted["preemptions_recompute"]}
    for key in ("output_tokens_per_s", "tpot_p50_ms"):
        m, p = measured[key], predicted[key]
        row[key] = {"measured": m, "predicted": p, "error": (p - m) / m if m else math.nan}
    row["within_target"] = all(abs(row[k]["error"]) <= TARGET for k in ("output_tokens_per_s", "tpot_p50_ms"))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| workload | pool pages | preemptions (engine / sim) | output tok/s measured | predicted | error | "
             "p50 TPOT ms measured | predicted | error | within 15% |", "|" + " --- |" * 10]
    for r in rows:
        t, p = r["output_tokens_per_s"], r["tpot_p50_ms"]
        lines.append(f"| {r['workload']} | {r['pool_pages']} | {r['preemptions']} / {r['predicted_preemptions']} | "
                     f"{t['measured']:,.0f} | {t['predicted']:,.0f} | {100 * t['error']:+.1f}% | "
                     f"{p['measured']:.2f} | {p['predicted']:.2f} | {100 * p['error']:+.1f}% | "
                     f"{'yes' if r['within_target'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sm = step_model(args)
    model = load_model(args.model, args.dtype, args.device, args.seed)
    trace = synthetic_trace(args.num_requests, args.dataset, seed=args.seed)
    prompts = list(PromptSource(max(2, min(model.config.vocab_size - 8, 32_000)), args.seed).prompts(trace))
    ps = args.page_size
    roomy_pages = sum(-(-(r.prompt_len + r.output_len) // ps) for r in trace) + 1
    rows, runs = [], {}
    measured = engine_run(model, trace, prompts, roomy_pages, args)
    runs["roomy"] = (measured, simulated_run(sm, trace, prompts, roomy_pages, args))
    largest = max(-(-(r.prompt_len + r.output_len) // ps) for r in trace)
    tight_pages = max(measured["peak_pages_used"] // 4, largest) + 1
    runs["pressure"] = (engine_run(model, trace, prompts, tight_pages, args),
                        simulated_run(sm, trace, prompts, tight_pages, args))
    rows = [compare(name, m, p) for name, (m, p) in runs.items()]
    print(table(rows))
    args.json.write_text(json.dumps({"step_model": sm.to_dict(), "rows": rows,
                                     "runs": {k: {"engine": m, "simulator": p} for k, (m, p) in runs.items()}},
                                    indent=2, default=str))
    print(f"written to {args.json}")
    return 0 if all(r["within_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
