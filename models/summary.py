"""Figures of one engine run: throughput, latency percentiles, pool occupancy, swap traffic."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pagemem.backend import device_name_of


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summarize(llm, outputs) -> dict:
    """Every summary figure of the last ``llm.generate`` as a flat, JSON-ready dict."""
    st = llm.stats
    elapsed = st.end_t - st.start_t
    out_tokens = sum(len(o.token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    ttft = [o.ttft_s for o in outputs]
    tpot = [o.tpot_s for o in outputs if len(o.token_ids) > 1]
    usable = llm.pool.num_pages - 1
    used = [s.num_used for s in st.steps] or [0]
    now, start = llm.counters(), st.counters_at_start
    d = {k: now[k] - start.get(k, 0) for k in now}              # this run's share of each counter
    page_bytes = llm.pool.config.page_bytes
    sw = llm.swap
    bw_out, bw_in = (sw.bandwidth("out"), sw.bandwidth("in")) if sw else (None, None)
    return {
        "model": llm.model.name, "device": device_name_of(llm.model.device), "dtype": llm.model.dtype.name,
        "num_requests": len(outputs), "elapsed_s": elapsed, "num_steps": len(st.steps),
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "requests_per_s": len(outputs) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
        "tpot_p50_ms": 1e3 * _pct(tpot, 50), "tpot_p99_ms": 1e3 * _pct(tpot, 99),
        "pool_pages": usable, "page_size": llm.pool.page_size, "page_bytes": page_bytes,
        "peak_pages_used": int(max(used)), "mean_kv_utilization": float(np.mean(used)) / usable,
        "peak_kv_utilization": max(used) / usable,
        "mean_fragmentation": float(np.mean([s.fragmentation for s in st.steps])) if st.steps else 0.0,
        "pages_swapped_out": d["pages_out"], "pages_swapped_in": d["pages_in"],
        "bytes_swapped_out": d["pages_out"] * page_bytes, "bytes_swapped_in": d["pages_in"] * page_bytes,
        "swap_out_gb_per_s": bw_out / 1e9 if bw_out else None, "swap_in_gb_per_s": bw_in / 1e9 if bw_in else None,
        "preemptions_swap": d["preempt_swap"], "preemptions_recompute": d["preempt_recompute"],
        "prefix_cache": llm.prefix_cache is not None,
        "prefix_hit_rate": d["prefix_hit_tokens"] / d["prefix_query_tokens"] if d["prefix_query_tokens"] else 0.0,
        "prefix_hit_tokens": d["prefix_hit_tokens"],
        "evictions": d["evictions"],
        "cuda_graph_replays": llm.graphs.num_replays if llm.graphs is not None else 0,
        **_step_split(st.steps),
    }


def _step_split(steps) -> dict:
    """Steps that only decode (one token per sequence) against steps that prefill."""
    dec = [s for s in steps if s.num_tokens == s.num_seqs]
    pre = [s for s in steps if s.num_tokens != s.num_seqs]
    return {"decode_steps": len(dec), "decode_s": sum(s.seconds for s in dec),
            "mean_decode_batch": float(np.mean([s.num_seqs for s in dec])) if dec else 0.0,
            "prefill_steps": len(pre), "prefill_s": sum(s.seconds for s in pre),
            "prefill_tokens": sum(s.num_tokens for s in pre)}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def format_summary(s: dict) -> str:
    gbs = lambda v: f"{v:.2f} GB/s" if v else "-"  # noqa: E731
    rows = [
        ("model", f"{s['model']} ({s['dtype']}) on {s['device']}"),
        ("requests", f"{s['num_requests']} in {s['elapsed_s']:.2f} s, {s['num_steps']} steps"),
        ("requests/s", f"{s['requests_per_s']:.2f}"),
        ("output tokens/s", f"{s['output_tokens_per_s']:.1f}  (total tokens/s {s['total_tokens_per_s']:.1f})"),
        ("TTFT p50 / p99", f"{s['ttft_p50_ms']:.1f} / {s['ttft_p99_ms']:.1f} ms"),
        ("TPOT p50 / p99", f"{s['tpot_p50_ms']:.2f} / {s['tpot_p99_ms']:.2f} ms"),
        ("steps", f"{s['decode_steps']} decode ({s['decode_s']:.2f} s, mean batch {s['mean_decode_batch']:.0f}), "
                  f"{s['prefill_steps']} with prefill ({s['prefill_s']:.2f} s)"),
        ("pool", f"{s['pool_pages']} pages x {s['page_size']} tokens ({_fmt_bytes(s['page_bytes'])} each)"),
        ("peak pages used", f"{s['peak_pages_used']} ({100 * s['peak_kv_utilization']:.0f}%)"),
        ("KV utilization", f"{100 * s['mean_kv_utilization']:.1f}% mean, "
                           f"{100 * s['mean_fragmentation']:.1f}% of held slots empty"),
        ("swapped out", f"{s['pages_swapped_out']} pages, {_fmt_bytes(s['bytes_swapped_out'])}, {gbs(s['swap_out_gb_per_s'])}"),
        ("swapped in", f"{s['pages_swapped_in']} pages, {_fmt_bytes(s['bytes_swapped_in'])}, {gbs(s['swap_in_gb_per_s'])}"),
        ("preemptions", f"swap {s['preemptions_swap']}, recompute {s['preemptions_recompute']}"),
        ("prefix hit rate", f"{100 * s['prefix_hit_rate']:.1f}%" if s["prefix_cache"] else "off"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot_timeline(llm, path: Path) -> None:
    """PNG: pages used/cached over time, and cumulative pages swapped out/in."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib (pip install 'pagemem[plot]'): {e}") from None
    st = llm.stats.steps
    t = [s.t for s in st]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.stackplot(t, [s.num_used for s in st], [s.num_cached for s in st], labels=["used", "cached (evictable)"])
    top.axhline(llm.pool.num_pages - 1, color="k", lw=0.8, ls="--", label="pool")
    top.set_ylabel("pages")
    top.legend(loc="upper right")
    top.set_title(f"{llm.model.name}: pool occupancy and swap traffic")
    bottom.plot(t, [s.pages_out for s in st], label="swapped out")
    bottom.plot(t, [s.pages_in for s in st], label="swapped in")
    bottom.plot(t, [s.num_swapped for s in st], label="requests swapped now", ls=":")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("pages (cumulative)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
