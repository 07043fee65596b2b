"""Figures of one engine run or one simulation: throughput, latency percentiles, pool occupancy,
swap traffic, preemptions, and the timeline plot.

Both go through ``figures``: ``summarize`` reads an ``LLM`` after ``generate``, and
``summarize_simulation`` a ``pagemem.simulator.SimResult``, so ``pagemem run`` and ``pagemem
simulate`` print the same table. A figure that does not exist (TPOT with no request of two or
more output tokens) is None, printed "n/a".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pagemem.backend import device_name_of


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What a summary needs from a run besides its requests."""

    model: str
    device: str
    dtype: str
    elapsed_s: float
    steps: Sequence              # StepRecord or SimStep: t, seconds, num_seqs, num_tokens, num_used, ...
    counters: dict[str, int]     # this run's share: pages_out/in, preempt_swap/recompute, demotions, ...
    pool_pages: int              # usable pages
    page_size: int
    page_bytes: int
    swap_gb_per_s: tuple[float | None, float | None]   # (out, in)
    prefix_cache: bool
    cuda_graph_replays: int = 0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(llm, outputs) -> dict:
    """Every summary figure of the last ``llm.generate`` as a flat, JSON-ready dict."""
    st = llm.stats
    now, start = llm.counters(), st.counters_at_start
    d = {k: now[k] - start.get(k, 0) for k in now}              # this run's share of each counter
    if "demotions" not in d:      # an engine whose counters() does not report them: the scheduler's own
        d["demotions"] = llm.scheduler.num_demotions - start.get("demotions", 0)
    sw = llm.swap
    bw = (sw.bandwidth("out"), sw.bandwidth("in")) if sw else (None, None)
    facts = RunFacts(llm.model.name, device_name_of(llm.model.device), llm.model.dtype.name, st.end_t - st.start_t,
                     st.steps, d, llm.pool.num_pages - 1, llm.pool.page_size, llm.pool.config.page_bytes,
                     tuple(b / 1e9 if b else None for b in bw), llm.prefix_cache is not None,
                     llm.graphs.num_replays if llm.graphs is not None else 0)
    return figures(facts, [len(o.prompt_token_ids) for o in outputs], [len(o.token_ids) for o in outputs],
                   [o.ttft_s for o in outputs], [o.tpot_s for o in outputs if len(o.token_ids) > 1])


def summarize_simulation(result, model: str = "simulated") -> dict:
    """The same figures for a ``SimResult``: times are the step model's, bytes its page bytes."""
    sched, sw, pc = result.scheduler, result.swap, result.prefix_cache
    stats = pc.stats() if pc is not None else None
    counters = {"pages_out": sw.num_pages_out if sw else 0, "pages_in": sw.num_pages_in if sw else 0,
                "preempt_swap": sched.num_preemptions["swap"], "preempt_recompute": sched.num_preemptions["recompute"],
                "demotions": sched.num_demotions, "evictions": result.pool.num_evictions,
                "prefix_query_tokens": stats.num_query_tokens if stats else 0,
                "prefix_hit_tokens": stats.num_hit_tokens if stats else 0}
    m = result.step_model
    swap_bw = (m.pcie_out_gb_per_s if counters["pages_out"] else None,      # as the engine: a figure once
               m.pcie_in_gb_per_s if counters["pages_in"] else None)         # pages have moved that way
    facts = RunFacts(model, "simulator (CPU), step model of " + str(m.meta.get("device", "an unnamed device")),
                     str(m.meta.get("dtype", "-")), result.elapsed_s, result.steps, counters,
                     result.config.num_pages - 1, result.config.page_size, result.page_bytes, swap_bw, pc is not None)
    outs = result.outputs
    return figures(facts, [o.num_prompt_tokens for o in outs], [o.num_output_tokens for o in outs],
                   [o.ttft_s for o in outs], [o.tpot_s for o in outs if o.tpot_s is not None])


def figures(f: RunFacts, in_tokens: list[int], out_tokens: list[int], ttft: list[float], tpot: list[float]) -> dict:
    """The flat dict of a run: ``tpot`` holds requests of two or more output tokens only."""
    elapsed, d, usable = f.elapsed_s, f.counters, f.pool_pages
    used = [s.num_used for s in f.steps] or [0]
    n_out, n_in, n = sum(out_tokens), sum(in_tokens), len(out_tokens)
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    return {
        "model": f.model, "device": f.device, "dtype": f.dtype,
        "num_requests": n, "elapsed_s": elapsed, "num_steps": len(f.steps),
        "input_tokens": n_in, "output_tokens": n_out,
        "requests_per_s": n / elapsed, "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "ttft_p50_ms": ms(_pct(ttft, 50)), "ttft_p99_ms": ms(_pct(ttft, 99)),
        "tpot_p50_ms": ms(_pct(tpot, 50)), "tpot_p99_ms": ms(_pct(tpot, 99)),
        "pool_pages": usable, "page_size": f.page_size, "page_bytes": f.page_bytes,
        "peak_pages_used": int(max(used)), "mean_kv_utilization": float(np.mean(used)) / usable,
        "peak_kv_utilization": max(used) / usable,
        "mean_fragmentation": float(np.mean([s.fragmentation for s in f.steps])) if f.steps else 0.0,
        "pages_swapped_out": d["pages_out"], "pages_swapped_in": d["pages_in"],
        "bytes_swapped_out": d["pages_out"] * f.page_bytes, "bytes_swapped_in": d["pages_in"] * f.page_bytes,
        "swap_out_gb_per_s": f.swap_gb_per_s[0], "swap_in_gb_per_s": f.swap_gb_per_s[1],
        # preemptions by the mode that served them: a demoted swap (host copy dropped) is a recompute
        "preemptions_swap": d["preempt_swap"], "preemptions_recompute": d["preempt_recompute"],
        "demotions": d["demotions"],
        "prefix_cache": f.prefix_cache,
        "prefix_hit_rate": d["prefix_hit_tokens"] / d["prefix_query_tokens"] if d["prefix_query_tokens"] else 0.0,
        "prefix_hit_tokens": d["prefix_hit_tokens"],
        "evictions": d["evictions"],
        "cuda_graph_replays": f.cuda_graph_replays,
        **split_steps(f.steps),
    }


def _prefill_tokens(s) -> int:
    """Tokens of a step's prefill rows: the record's own count where it keeps one (SimStep, and a
    StepRecord with ``num_prefill_tokens``); else every token of a step with more tokens than rows."""
    n = getattr(s, "num_prefill_tokens", None)
    if n is not None:
        return n
    return 0 if s.num_tokens == s.num_seqs else s.num_tokens


def split_steps(steps) -> dict:
    """Steps that only decode against steps with prefill rows (one-token prompt chunks included)."""
    pre_tokens = [_prefill_tokens(s) for s in steps]
    dec = [s for s, p in zip(steps, pre_tokens) if p == 0]
    pre = [s for s, p in zip(steps, pre_tokens) if p != 0]
    return {"decode_steps": len(dec), "decode_s": sum(s.seconds for s in dec),
            "mean_decode_batch": float(np.mean([s.num_seqs for s in dec])) if dec else 0.0,
            "prefill_steps": len(pre), "prefill_s": sum(s.seconds for s in pre),
            "prefill_tokens": sum(pre_tokens)}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _pair(a: float | None, b: float | None, spec: str, unit: str) -> str:
    return "n/a" if a is None else f"{a:{spec}} / {b:{spec}} {unit}"


def format_summary(s: dict) -> str:
    gbs = lambda v: f"{v:.2f} GB/s" if v else "-"  # noqa: E731
    dropped = s["pages_swapped_out"] - s["pages_swapped_in"]
    rows = [
        ("model", f"{s['model']} ({s['dtype']}) on {s['device']}"),
        ("requests", f"{s['num_requests']} in {s['elapsed_s']:.2f} s, {s['num_steps']} steps"),
        ("requests/s", f"{s['requests_per_s']:.2f}"),
        ("output tokens/s", f"{s['output_tokens_per_s']:.1f}  (total tokens/s {s['total_tokens_per_s']:.1f})"),
        ("TTFT p50 / p99", _pair(s["ttft_p50_ms"], s["ttft_p99_ms"], ".1f", "ms")),
        ("TPOT p50 / p99", _pair(s["tpot_p50_ms"], s["tpot_p99_ms"], ".2f", "ms")),
        ("steps", f"{s['decode_steps']} decode ({s['decode_s']:.2f} s, mean batch {s['mean_decode_batch']:.0f}), "
                  f"{s['prefill_steps']} with prefill ({s['prefill_s']:.2f} s)"),
        ("pool", f"{s['pool_pages']} pages x {s['page_size']} tokens ({_fmt_bytes(s['page_bytes'])} each)"),
        ("peak pages used", f"{s['peak_pages_used']} ({100 * s['peak_kv_utilization']:.0f}%)"),
        ("KV utilization", f"{100 * s['mean_kv_utilization']:.1f}% mean, "
                           f"{100 * s['mean_fragmentation']:.1f}% of held slots empty"),
        ("swapped out", f"{s['pages_swapped_out']} pages, {_fmt_bytes(s['bytes_swapped_out'])}, {gbs(s['swap_out_gb_per_s'])}"),
        ("swapped in", f"{s['pages_swapped_in']} pages, {_fmt_bytes(s['bytes_swapped_in'])}, {gbs(s['swap_in_gb_per_s'])}"
                       + (f"  ({dropped} never: host copies dropped)" if dropped > 0 else "")),
        ("preemptions", f"swap {s['preemptions_swap']}, recompute {s['preemptions_recompute']}"
                        + (f" ({s['demotions']} of them swapped first, then demoted)" if s["demotions"] else "")),
        ("prefix hit rate", f"{100 * s['prefix_hit_rate']:.1f}%" if s["prefix_cache"] else "off"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot_timeline(llm, path: Path) -> None:
    """PNG of an engine run's timeline (``timeline_figure``)."""
    save_timeline(llm.stats.steps, llm.pool.num_pages - 1, f"{llm.model.name}: pool, swap and queues", path)


def save_timeline(steps, pool_pages: int, title: str, path: Path, max_points: int = 5000) -> None:
    """Write ``timeline_figure`` as a PNG, steps thinned to ``max_points`` evenly spaced ones."""
    plt = _pyplot()
    stride = max(1, -(-len(steps) // max_points))
    fig = timeline_figure(steps[::stride], pool_pages, title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def timeline_figure(steps, pool_pages: int, title: str):
    """Three panels over time, each with its own axis and its legend outside the data: pages
    used and cached (against the pool), cumulative pages swapped out and in, and requests
    running, waiting and swapped now."""
    plt = _pyplot()
    t = [s.t for s in steps]
    fig, (pool, swap, queues) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    pool.stackplot(t, [s.num_used for s in steps], [s.num_cached for s in steps], labels=["used", "cached (evictable)"])
    pool.axhline(pool_pages, color="k", lw=0.8, ls="--", label="pool")
    pool.set_ylabel("pages")
    pool.set_title(title)
    swap.plot(t, [s.pages_out for s in steps], label="swapped out")
    swap.plot(t, [s.pages_in for s in steps], label="swapped in")
    swap.set_ylabel("pages (cumulative)")
    queues.plot(t, [s.num_running for s in steps], label="running")
    queues.plot(t, [s.num_waiting for s in steps], label="waiting")
    queues.plot(t, [s.num_swapped for s in steps], label="requests swapped now", ls=":")
    queues.set_ylabel("requests")
    queues.set_xlabel("seconds")
    for ax in (pool, swap, queues):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib (pip install 'pagemem[plot]'): {e}") from None
    return plt
