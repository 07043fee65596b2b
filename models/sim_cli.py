"""``pagemem simulate`` and ``pagemem calibrate``: the engine's scheduling replayed on the CPU,
timed by a step-time model measured on a GPU.

    pagemem calibrate --model random:llama-3.2-1b --out step_model.json          # on the GPU
    pagemem simulate --step-model step_model.json --dataset sharegpt --num-prompts 100000 \\
        --request-rate 400 --num-pages 8193 --plot timeline.png                 # anywhere

``simulate`` takes a JSONL trace (``--trace``), a ShareGPT- or Alpaca-like synthetic one, or the
workload flags of ``pagemem run`` (the same prompts, from the same seed), and prints the summary
``pagemem run`` prints. ``--reservations`` adds the memory-waste table of contiguous reservation
allocators at the same memory (``pagemem.reservation``). Without ``--step-model`` it uses
``estimated_step_model()``, an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pagemem.models.cli import (DEFAULT_MODEL, DEMO_NUM_PAGES, SEED, _positive, _power_of_two, _ranged,
                                 check_device, check_output_path, check_plot_path, make_workload)
from pagemem.models.summary import format_summary, save_timeline, summarize_simulation
from pagemem.reservation import POLICIES, paged_account, simulate_reservation
from pagemem.simulator import SimConfig, Simulator, StepModel
from pagemem.traces import PromptSource, load_trace, poisson_arrivals, save_trace, synthetic_trace, TraceRequest

RUN_DATASETS = ("random", "prefix-repetition")      # pagemem run's workloads (make_workload)
SYNTHETIC = ("sharegpt", "alpaca")                   # pagemem.traces.DATASETS


def add_parser(subparsers) -> None:
    """Register ``simulate`` and ``calibrate`` on the ``pagemem`` parser's subcommands."""
    cmd = subparsers.add_parser("simulate", help="replay a trace through the scheduler on the CPU, timed by a step model")
    cmd.set_defaults(func=simulate)
    src = cmd.add_argument_group("trace")
    src.add_argument("--trace", type=Path, default=None, help="JSONL trace (overrides --dataset; default: none)")
    src.add_argument("--dataset", choices=RUN_DATASETS + SYNTHETIC, default="random",
                     help="pagemem run's workloads, or lengths like the paper's ShareGPT / Alpaca")
    src.add_argument("--num-prompts", type=_positive(int), default=128, help="requests")
    src.add_argument("--input-len", type=_positive(int), default=96, help="random / prefix-repetition")
    src.add_argument("--output-len", type=_positive(int), default=64, help="random / prefix-repetition")
    src.add_argument("--range-ratio", type=_ranged(float, 0, 1, hi_open=True), default=0.5,
                     help="random / prefix-repetition: lengths len*(1-r) .. len*(1+r)")
    src.add_argument("--request-rate", type=_positive(float, allow_inf=True), default=math.inf,
                     help="Poisson arrivals, requests/s (default: all at once)")
    src.add_argument("--prefix-share", type=_ranged(float, 0, 1), default=0.0, help="sharegpt / alpaca: share of requests with a shared prefix")
    src.add_argument("--num-prefix-groups", type=_positive(int), default=4, help="sharegpt / alpaca")
    src.add_argument("--prefix-len", type=_positive(int), default=64, help="sharegpt / alpaca: shared tokens")
    src.add_argument("--save-trace", type=Path, default=None, help="write the trace replayed as JSONL (default: none)")
    src.add_argument("--model", default=DEFAULT_MODEL, help="its vocabulary and context limit (weights not loaded)")
    _engine_flags(cmd)
    cmd.add_argument("--step-model", type=Path, default=None, help="JSON from pagemem calibrate (default: an estimate)")
    cmd.add_argument("--reservations", action="store_true", help="also the memory-waste table of reservation allocators")
    cmd.add_argument("--max-model-len", type=_positive(int), default=2048, help="the 'max' reservation")
    cmd.add_argument("--seed", type=SEED, default=0, help="of the trace and its prompts")
    cmd.add_argument("--json", type=Path, default=None, help="write every summary figure here (default: none)")
    cmd.add_argument("--plot", type=Path, default=None,
                     help="image of pool occupancy, swap traffic and queues, e.g. sim.png (default: none; "
                          "needs matplotlib)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal = subparsers.add_parser("calibrate", help="measure the step-time model of a model on this device (a GPU)")
    cal.set_defaults(func=calibrate)
    cal.add_argument("--model", default="random:llama-3.2-1b", help="checkpoint folder or random:<preset>")
    cal.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                     help="weights and pool (default: float16 on CUDA, float32 on the CPU; bfloat16 on CUDA only)")
    cal.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where the engine runs; auto: CUDA when usable")
    cal.add_argument("--page-size", type=_power_of_two, default=16, help="tokens a page")
    cal.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 32, 64, 128, 256),
                     help="decode grid rows, comma-separated, increasing (default: 1,8,32,64,128,256)")
    cal.add_argument("--context-lens", type=_int_list, default=(128, 512, 1024, 2048),
                     help="decode grid columns: prompt tokens a sequence, comma-separated "
                          "(default: 128,512,1024,2048)")
    cal.add_argument("--decode-steps", type=_ranged(int, 1, 10_000), default=16,
                     help="decode steps timed at each grid point (1 to 10000)")
    cal.add_argument("--prefill-tokens", type=_int_list, default=(2048, 8192, 16384),
                     help="tokens of each prefill step timed, comma-separated (default: 2048,8192,16384)")
    cal.add_argument("--prefill-prompt-len", type=_positive(int), default=512, help="prompts the prefill steps are made of")
    cal.add_argument("--swap-pages", type=_positive(int), default=256, help="scattered pages of each timed swap")
    cal.add_argument("--repeats", type=_ranged(int, 1, 1000), default=3,
                     help="of each prefill and swap timing (median; 1 to 1000)")
    cal.add_argument("--seed", type=SEED, default=0, help="of the prompts")
    cal.add_argument("--out", type=Path, required=True, help="where the step model JSON goes")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1 or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing ints >= 1, got {text!r}")
    return values


def _engine_flags(cmd) -> None:
    cmd.add_argument("--page-size", type=_power_of_two, default=16, help="tokens a page")
    pool = cmd.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=_ranged(int, 2), default=None,
                      help=f"pool pages, NULL_PAGE included (default: {DEMO_NUM_PAGES} for the tiny model; "
                           f"another model needs it or --kv-memory-gib)")
    pool.add_argument("--kv-memory-gib", type=_positive(float), default=None,
                      help="pool size in GiB at the step model's bytes a token, instead of --num-pages (default: none)")
    cmd.add_argument("--swap-space", type=_ranged(float, 0), default=1.0, help="GiB of host memory for swapped pages")
    cmd.add_argument("--max-num-seqs", type=_positive(int), default=256, help="sequences a step")
    cmd.add_argument("--max-num-batched-tokens", type=_positive(int), default=2048, help="tokens a step")
    cmd.add_argument("--admit-batch", type=_positive(int), default=1, help="admit when this many slots are free")
    cmd.add_argument("--preemption", choices=["swap", "recompute", "auto"], default="swap", help="as pagemem run's")
    cmd.add_argument("--eviction", choices=["lru", "fifo", "priority"], default="lru", help="prefix-cache victims")
    cmd.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                     help="share the pages of common prompt prefixes (default: on for --dataset prefix-repetition, "
                          "or sharegpt / alpaca with --prefix-share > 0, unless --trace; else off)")
    cmd.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="take sampled ids in a step late, as the engine does")


def estimated_step_model() -> StepModel:
    """Llama-3.2-1B in fp16 on an H200, estimated (not measured) from DESIGN.md's H200 figures:
    a decode step reads the weights (2.47 GB) and the batch's K/V (32 KiB a token) at 4.1 TB/s,
    plus 0.5 ms of host work a step (an assumption); prefill at 2 FLOPs a parameter a token and
    an assumed 40% of the H200's 989 dense fp16 TFLOP/s; PCIe at the pinned 55.2 / 55.4 GB/s.
    Calibrate on the GPU for figures that mean something."""
    weights, hbm, kv = 2.47e9, 4.1e12, 32768
    batch, context = (1, 1024), (1, 8192)
    grid = tuple(tuple(5e-4 + (weights + b * c * kv) / hbm for c in context) for b in batch)
    return StepModel(batch, context, grid, 0.4 * 989e12 / (2 * 1.24e9), 5e-4, 55.2, 55.4, kv,
                     {"source": "estimate from DESIGN.md figures, not measured", "model": "random:llama-3.2-1b",
                      "device": "NVIDIA H200 (estimated)", "dtype": "float16"})


def _model_limits(name: str) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of a checkpoint folder or random:<preset>, read from
    its config alone."""
    from pagemem.models.config import ModelConfig
    from pagemem.models.presets import preset_config
    if name.startswith("random:"):
        c = preset_config(name[len("random:"):])
    else:
        if not Path(name).is_dir():
            raise FileNotFoundError(f"--model: {name} is not a folder (nor 'random:<preset>')")
        c = ModelConfig.from_hf(Path(name))
    return c.vocab_size, c.max_position_embeddings


def build_trace(args) -> tuple[list[TraceRequest], object]:
    """(trace, prompts): the trace the flags name and its prompts (a list, or a PromptSource)."""
    vocab, limit = _model_limits(args.model)
    source = PromptSource(max(2, min(vocab - 8, 32_000)), args.seed)
    if args.trace is not None:
        trace, prompts = load_trace(args.trace), source
    elif args.dataset in SYNTHETIC:
        if not 0.0 <= args.prefix_share <= 1.0:
            raise ValueError(f"--prefix-share must be in [0, 1], got {args.prefix_share}")
        trace = synthetic_trace(args.num_prompts, args.dataset, args.request_rate, args.seed,
                                prefix_share=args.prefix_share, num_prefix_groups=args.num_prefix_groups,
                                prefix_len=args.prefix_len)
        prompts = source
    else:
        if not 0 <= args.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
        prompts, out_lens = make_workload(args, vocab, reserved=8)   # pagemem run's very prompts
        import numpy as np
        arrivals = poisson_arrivals(np.random.default_rng([args.seed, 1]), len(prompts), args.request_rate)
        trace = [TraceRequest(float(t), len(p), int(n)) for t, p, n in zip(arrivals.tolist(), prompts, out_lens)]
    too_long = next((i for i, r in enumerate(trace) if r.prompt_len + r.output_len > limit), None)
    if too_long is not None:
        r = trace[too_long]
        raise ValueError(f"request {too_long}: prompt of {r.prompt_len} tokens + {r.output_len} output tokens "
                         f"exceeds the model's context of {limit} tokens")
    return trace, prompts


def sim_config(args, model: StepModel, prefix_default: bool) -> SimConfig:
    num_pages = args.num_pages
    if args.kv_memory_gib is not None:
        num_pages = int(args.kv_memory_gib * 2**30) // (model.kv_bytes_per_token * args.page_size) + 1
    elif num_pages is None:
        if args.model != DEFAULT_MODEL:
            raise ValueError("give --num-pages or --kv-memory-gib (the simulator has no GPU memory to size from)")
        num_pages = DEMO_NUM_PAGES
    prefix = args.enable_prefix_caching if args.enable_prefix_caching is not None else prefix_default
    return SimConfig(num_pages, args.page_size, args.max_num_seqs, args.max_num_batched_tokens, args.preemption,
                     args.eviction, prefix, 0.01, args.admit_batch, args.async_scheduling, args.swap_space)


def simulate(args) -> dict:
    """Run the simulation the flags describe; print (and write) the summary; return it."""
    for path, flag in ((args.json, "--json"), (args.save_trace, "--save-trace")):
        check_output_path(path, flag)
    check_plot_path(args.plot)
    if args.trace is not None and not args.trace.is_file():
        raise FileNotFoundError(f"--trace {args.trace}: No such file (a JSONL trace is expected)")
    model = _load_step_model(args.step_model) if args.step_model is not None else estimated_step_model()
    trace, prompts = build_trace(args)
    if args.save_trace is not None:
        save_trace(args.save_trace, trace)
    prefix_default = args.dataset == "prefix-repetition" or (args.dataset in SYNTHETIC and args.prefix_share > 0)
    config = sim_config(args, model, prefix_default and args.trace is None)
    sim = Simulator(trace, model, config, prompts=prompts)
    result = _run(sim, len(trace), not args.no_progress)
    summary = summarize_simulation(result, model=f"{model.meta.get('model') or args.model} (simulated)")
    summary["step_model"] = model.meta
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    print(format_summary(summary))
    if args.reservations:
        reports = [paged_account(result)] + [
            simulate_reservation(trace, model, p, (config.num_pages - 1) * config.page_size,
                                 max_len=args.max_model_len, max_num_seqs=config.max_num_seqs,
                                 max_num_batched_tokens=config.max_num_batched_tokens) for p in POLICIES]
        print()
        print(format_reservation_table(reports))
        summary["reservations"] = [_no_nan(r._asdict()) for r in reports]
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot is not None:
        save_timeline(result.steps, config.num_pages - 1, f"{args.model}, simulated: pool, swap and queues", args.plot)
    return summary


def _load_step_model(path: Path) -> StepModel:
    """--step-model's file, a bad one refused with a ValueError naming the flag."""
    if not path.is_file():
        raise FileNotFoundError(f"--step-model: no file at {path}")
    try:
        return StepModel.load(path)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ValueError(f"--step-model {path}: not a step model from pagemem calibrate ({type(e).__name__}: {e})") from None


def _no_nan(d: dict) -> dict:
    """NaN (a share over no time under load) as None, which JSON has."""
    fix = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {k: ({kk: fix(vv) for kk, vv in v.items()} if isinstance(v, dict) else fix(v)) for k, v in d.items()}


def _run(sim: Simulator, total: int, progress: bool):
    if not progress:
        return sim.run()
    from tqdm import tqdm
    with tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True) as bar:
        return sim.run(bar.update)


def format_reservation_table(reports) -> str:
    """A markdown table: each allocator's shares of K/V memory under load, peak batch, throughput."""
    head = ("| allocator | token states / reserved | token states | reservation | internal frag. | "
            "external frag. | unused | peak batch | output tok/s | req/s |")
    rows = [head, "|" + " --- |" * 10]
    for r in reports:
        s = r.shares
        rows.append(f"| {r.allocator} | {100 * r.token_share_of_reserved:.1f}% | " +
                    " | ".join(f"{100 * s[k]:.1f}%" for k in ("token_states", "reservation", "internal",
                                                              "external", "unused")) +
                    f" | {r.peak_batch} | {r.output_tokens_per_s:,.0f} | {r.requests_per_s:.2f} |")
    return "\n".join(rows)


# ---- calibrate ----------------------------------------------------------------------------------
def calibrate(args) -> StepModel:
    """Measure the step model with the real engine and write it to ``--out``."""
    from pagemem.models.engine import LLM
    check_output_path(args.out, "--out")
    check_device(args.device)
    ps, steps = args.page_size, args.decode_steps
    budget = max(16384, max(args.prefill_tokens))
    per_seq = -(-(max(args.context_lens) + _decode_max_tokens(max(args.batch_sizes), max(args.context_lens), steps,
                                                              budget)) // ps)
    prefill_seqs = -(-max(args.prefill_tokens) // args.prefill_prompt_len)
    need = max(args.batch_sizes) * (per_seq + 1) + prefill_seqs * -(-(args.prefill_prompt_len + 1) // ps) \
        + 2 * args.swap_pages + 1
    num_pages = -(-need * 100 // 98)    # admission keeps the engine's 1% watermark of the pool free
    probe = LLM(args.model, dtype=args.dtype, device=args.device, page_size=ps, num_pages=2, swap_space=0)
    swap_gib = 4 * args.swap_pages * probe.pool.config.page_bytes / 2**30
    llm = LLM(probe.model, page_size=ps, num_pages=num_pages, swap_space=swap_gib, preemption="swap",
              max_num_seqs=max(max(args.batch_sizes), prefill_seqs),
              max_num_batched_tokens=budget, seed=args.seed)
    del probe
    llm.warmup(max(args.context_lens) + steps + 2)
    model = measure_step_model(llm, args.batch_sizes, args.context_lens, steps, args.prefill_tokens,
                               args.prefill_prompt_len, args.swap_pages, args.repeats, args.seed)
    model.save(args.out)
    print(json.dumps(model.to_dict()["meta"]) + f"\nstep model written to {args.out}")
    return model


def measure_step_model(llm, batch_sizes, context_lens, decode_steps: int, prefill_tokens, prompt_len: int,
                       swap_pages: int, repeats: int = 3, seed: int = 0) -> StepModel:
    """The StepModel of ``llm`` (an idle LLM whose pool holds the largest grid point and whose
    HostSwap holds 2 x swap_pages pages), measured through its public steps and its HostSwap."""
    import time
    import numpy as np
    from pagemem.backend import device_name_of
    rng = np.random.default_rng(seed)
    vocab = max(2, min(llm.model.config.vocab_size - 8, 32_000))
    grid = [[_decode_seconds(llm, b, c, decode_steps, rng, vocab) for c in context_lens] for b in batch_sizes]
    n = list(prefill_tokens)
    t = [_prefill_seconds(llm, k, prompt_len, repeats, rng, vocab) for k in n]
    slope, intercept = np.polyfit(n, t, 1) if len(n) > 1 else (t[0] / n[0], 0.0)
    if slope <= 0:                      # noise larger than the trend: the rate of the largest step
        slope, intercept = t[-1] / n[-1], 0.0
    out_gbs, in_gbs = _pcie(llm, swap_pages, repeats)
    ps = llm.pool.page_size
    meta = {"model": llm.model.name, "dtype": llm.model.dtype.name, "device": device_name_of(llm.model.device),
            "page_size": ps, "decode_steps": decode_steps, "prefill_prompt_len": prompt_len,
            "swap_pages": swap_pages, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return StepModel(tuple(batch_sizes), tuple(c + 1 + decode_steps // 2 for c in context_lens),
                     tuple(tuple(row) for row in grid), float(1.0 / slope), float(max(intercept, 0.0)),
                     out_gbs, in_gbs, llm.pool.config.page_bytes // ps, meta)


def _serve(llm, prompts, max_tokens: int) -> list:
    """Add the prompts (greedy, ignore_eos) and step until done; the StepRecords of those steps."""
    from pagemem.models.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    n0 = len(llm.stats.steps)
    while llm.has_unfinished():
        llm.step()
    return llm.stats.steps[n0:]


def _decode_max_tokens(batch: int, context: int, steps: int, budget: int) -> int:
    """Output tokens a calibration request asks for. The prompts of ``batch`` requests prefill in
    chunks over about ceil(batch * context / (budget - batch)) steps (a step's decode rows take
    from its token budget too), and a request whose prompt finished early decodes one token in each
    later step; it must still have ``steps`` + 2 to go when the last prompt is done, so that the
    whole batch decodes that many steps together."""
    if budget <= batch:
        raise ValueError(f"calibrate: a step's {budget} tokens cannot prefill beside {batch} decode rows")
    return steps + 4 + -(-batch * context // (budget - batch))


def _decode_seconds(llm, batch: int, context: int, steps: int, rng, vocab: int) -> float:
    """Median seconds of the decode-only steps of ``batch`` sequences of ``context`` prompt tokens
    (the first ``steps`` of them after the first, which shares its time with the last prefill).
    Requests whose prompt finished early are up to that many prefill steps' tokens further on."""
    import statistics
    max_tokens = _decode_max_tokens(batch, context, steps, llm.scheduler.max_num_batched_tokens)
    recs = _serve(llm, [rng.integers(0, vocab, context).tolist() for _ in range(batch)], max_tokens)
    dec = [s.seconds for s in recs if s.num_seqs == batch and s.num_tokens == batch]
    if not dec:
        raise RuntimeError(f"calibrate: no decode-only step at batch {batch}, context {context}")
    return float(statistics.median(dec[1:steps + 1] or dec))


def _prefill_seconds(llm, tokens: int, prompt_len: int, repeats: int, rng, vocab: int) -> float:
    """Median seconds of one step prefilling ``tokens`` prompt tokens (prompts of ``prompt_len``)."""
    import statistics
    lens = [prompt_len] * (tokens // prompt_len) + ([tokens % prompt_len] if tokens % prompt_len else [])
    times = []
    for _ in range(repeats):
        recs = _serve(llm, [rng.integers(0, vocab, k).tolist() for k in lens], 1)
        times += [s.seconds for s in recs if s.num_tokens == tokens]
    if not times:
        raise RuntimeError(f"calibrate: the {tokens} prefill tokens did not run in one step")
    return float(statistics.median(times))


def _pcie(llm, num_pages: int, repeats: int) -> tuple[float, float]:
    """(out, in) GB/s of the HostSwap moving ``num_pages`` scattered pages, median of repeats."""
    import statistics
    pool, sw = llm.pool, llm.swap
    nbytes = num_pages * pool.config.page_bytes
    out, back = [], []
    for _ in range(repeats):
        got = pool.allocate(2 * num_pages)
        pool.free(got[1::2])                   # every other page: scattered, as a sequence's pages are
        ticket = sw.swap_out(got[::2], llm.stream)
        sw.wait(ticket)
        out.append(sw.last_copy_s["out"])
        pages = sw.swap_in(ticket, llm.stream)
        sw.reclaim(wait=True)
        back.append(sw.last_copy_s["in"])
        pool.free(pages)
    gbs = lambda secs: nbytes / max(statistics.median(secs), 1e-9) / 1e9  # noqa: E731
    return gbs(out), gbs(back)
