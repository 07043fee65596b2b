"""Where an engine run spends its time: the summary's step split plus a cProfile of the host side.

    python bench/profile_engine.py [num_requests] [model] [max_num_batched_tokens] [admit_batch] [profile]
                                   [max_num_seqs]
    (defaults: 300, random:llama-3.2-1b, then bench_e2e's ENGINE: 16384, 32, profile on, 1024)

It prints the mean host time of each step's parts (schedule, queue the step, wait for its ids),
which the engine records in every StepRecord, for decode-only steps and steps with prefill.
PAGEMEM_SYNC=1 turns async scheduling off (the sampled ids reach the host every step); with
PAGEMEM_BOTH=1 the same engine serves the workload twice, async then sync, and prints both.

Requests come from bench_e2e's seeded workload. Host functions are profiled with cProfile; GPU
time shows up in the calls that wait for it (sampling copies the tokens to the host).
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.bench_e2e as a script; last, so installed packages win
from bench.bench_e2e import ENGINE, workload
from pagemem.models import SamplingParams
from pagemem.models.engine import LLM
from pagemem.models.summary import format_summary, summarize


def report(steps) -> None:
    """Mean host time of each step part (the engine's StepRecord fields), decode-only steps apart
    from steps with prefill. ``wait`` is the wait for a step's ids: with async scheduling it comes
    after the next step was queued, so it is the GPU time the host could not hide."""
    for kind in ("decode", "prefill"):
        rows = [s for s in steps if (s.num_prefill_tokens == 0) == (kind == "decode")]
        if rows:
            cells = [f"{name} {1e3 * sum(getattr(s, name + '_s') for s in rows) / len(rows):.2f} ms"
                     for name in ("schedule", "launch", "wait")]
            print(f"steps {kind:7s} x{len(rows)}: mean " + ", ".join(cells))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    model = sys.argv[2] if len(sys.argv) > 2 else "random:llama-3.2-1b"
    budget = int(sys.argv[3]) if len(sys.argv) > 3 else ENGINE["max_num_batched_tokens"]
    admit = int(sys.argv[4]) if len(sys.argv) > 4 else ENGINE["admit_batch"]
    profile = (sys.argv[5] if len(sys.argv) > 5 else "1") == "1"
    t0 = time.perf_counter()
    seqs = int(sys.argv[6]) if len(sys.argv) > 6 else ENGINE["max_num_seqs"]
    llm = LLM(model, **{**ENGINE, "max_num_batched_tokens": budget, "admit_batch": admit, "max_num_seqs": seqs})
    print(f"load {time.perf_counter() - t0:.1f} s")
    warm = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)] * 2
    llm.generate([[1] * 40, [2] * 300], warm)
    t0 = time.perf_counter()
    llm.warmup(1024 + 512)           # compile prefill kernels, capture decode graphs
    print(f"start-up graph capture {time.perf_counter() - t0:.1f} s")
    prompts, out_lens = workload(n)
    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in out_lens]
    modes = [True, False] if os.environ.get("PAGEMEM_BOTH") == "1" else [os.environ.get("PAGEMEM_SYNC") != "1"]
    prof = cProfile.Profile()
    for mode in modes:
        llm.async_scheduling = mode
        prof = cProfile.Profile()
        if profile:
            prof.enable()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - t0
        prof.disable()
        tokens = sum(len(o.token_ids) for o in outs)
        print(f"async_scheduling={mode}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.0f} tok/s")
        report(llm.stats.steps)
        print(format_summary(summarize(llm, outs)))
    if llm.graphs is not None:
        g = llm.graphs
        print(f"graphs: {g.num_captures} captures in {g.capture_s:.2f} s, {g.num_replays} replays, "
              f"disabled: {g.disabled}")
    if profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
