"""Serving benchmark in the manner of ``vllm bench serve``: Poisson arrivals at several request
rates against ``pagemem serve``, streaming completions, latency seen by the clients.

    python bench/bench_serve.py --model random:llama-3.2-1b --rates 4,16,64,inf --num-prompts 200 --json out.json
    python bench/bench_serve.py --model random:tiny --device cpu --rates 2,8,inf --num-prompts 16 \\
        --input-len 32 --output-len 16 --server-args "--num-pages 64"          # CPU smoke run

It starts the server itself (``--url`` uses a running one instead), sends ``--num-prompts``
requests per rate (random token-id prompts of ``--input-len`` +- ``--range-ratio``, exactly
the drawn number of output tokens: ``ignore_eos``), and reports per rate: request throughput,
output tokens/s, TTFT, TPOT (mean time per output token after the first, per request) and ITL
(gaps between tokens) at p50/p99, with the pool's preemptions, swapped pages and peak queue
lengths scraped from /metrics. Rate ``inf`` sends every request at once.

The breakaway rate is the lowest rate whose p50 TTFT exceeds ``--breakaway-factor`` times the
lowest rate's p50 TTFT, or whose p99 TPOT exceeds that factor times the lowest rate's: the
rate past which requests queue faster than the server drains them.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench._harness as a script; last, so installed packages win
from bench._harness import device_name  # noqa: E402
from pagemem.models.server_process import ServerProcess  # noqa: E402

PROMPT_ID_LIMIT = 256       # prompt ids below every vocabulary's specials (the byte range)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama-3.2-1b")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--server-args", default="", help="more `pagemem serve` flags, one string")
    p.add_argument("--url", default=None, help="a running server (its flags are then its own)")
    p.add_argument("--rates", default="4,16,64,inf", help="requests/s, comma-separated; inf: all at once")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths drawn from len*(1-r) .. len*(1+r)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--breakaway-factor", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def workload(args) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request, seeded."""
    rng = np.random.default_rng(args.seed)
    lo, hi = 1.0 - args.range_ratio, 1.0 + args.range_ratio
    ins = rng.integers(max(1, int(args.input_len * lo)), int(args.input_len * hi) + 1, args.num_prompts)
    outs = rng.integers(max(1, int(args.output_len * lo)), int(args.output_len * hi) + 1, args.num_prompts)
    return [(rng.integers(0, PROMPT_ID_LIMIT, n).tolist(), int(m)) for n, m in zip(ins, outs)]


def arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start: a Poisson process of ``rate`` (all 0 for inf)."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, n))


async def one_request(client, model: str, prompt, max_tokens: int, temperature: float) -> dict:
    """Stream one completion; the client-side timings of its tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    token_times, usage = [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                now = time.perf_counter()
                for c in chunk["choices"]:
                    token_times += [now] * len(c.get("token_ids", ()))
                usage = chunk.get("usage") or usage
    except httpx2.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not token_times:
        return {"ok": False, "error": "no tokens"}
    n = usage["completion_tokens"] if usage else len(token_times)
    ttft = token_times[0] - t0
    return {"ok": True, "ttft": ttft, "e2e": end - t0, "tpot": (end - t0 - ttft) / (n - 1) if n > 1 else None,
            "itl": np.diff(token_times).tolist(), "output_tokens": n, "prompt_tokens": len(prompt)}


async def run_rate(url: str, model: str, reqs, rate: float, args, bar) -> dict:
    """Send every request at its Poisson time; gather timings and the server's /metrics deltas."""
    rng = np.random.default_rng(args.seed + 1)
    times = arrivals(rate, len(reqs), rng)
    limit = asyncio.Semaphore(args.max_concurrency or len(reqs))
    limits = httpx2.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx2.AsyncClient(base_url=url, timeout=httpx2.Timeout(None), limits=limits) as client:
        before = await scrape(client)
        peaks = {"running": 0.0, "waiting": 0.0, "swapped": 0.0, "kv_utilization": 0.0}
        sampler = asyncio.ensure_future(sample_peaks(client, peaks))
        start = time.perf_counter()

        async def send(i: int) -> dict:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            async with limit:
                out = await one_request(client, model, reqs[i][0], reqs[i][1], args.temperature)
            bar.update(1)
            return out

        results = await asyncio.gather(*(send(i) for i in range(len(reqs))))
        duration = time.perf_counter() - start
        sampler.cancel()
        after = await scrape(client)
    return summarize(rate, results, duration, before, after, peaks)


async def scrape(client) -> dict[tuple, float]:
    """/metrics as {(name, labels...): value}."""
    text = (await client.get("/metrics")).text
    return {(s.name, *sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def sample_peaks(client, peaks: dict, every: float = 0.05) -> None:
    names = {"running": "pagemem_requests_running", "waiting": "pagemem_requests_waiting",
             "swapped": "pagemem_requests_swapped", "kv_utilization": "pagemem_kv_utilization"}
    while True:
        m = await scrape(client)
        for key, name in names.items():
            peaks[key] = max(peaks[key], m.get((name,), 0.0))
        await asyncio.sleep(every)


def percentiles(values) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float) * 1e3
    if v.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def summarize(rate: float, results: list[dict], duration: float, before: dict, after: dict, peaks: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)

    def delta(name, **labels):
        key = (name, *sorted(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return {
        "rate": "inf" if math.isinf(rate) else rate, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": percentiles(r["ttft"] for r in ok), "tpot_ms": percentiles(r["tpot"] for r in ok),
        "itl_ms": percentiles(x for r in ok for x in r["itl"]), "e2e_ms": percentiles(r["e2e"] for r in ok),
        "server": {"preemptions_swap": delta("pagemem_preemptions_total", mode="swap"),
                   "preemptions_recompute": delta("pagemem_preemptions_total", mode="recompute"),
                   "pages_out": delta("pagemem_swap_pages_total", direction="out"),
                   "pages_in": delta("pagemem_swap_pages_total", direction="in"),
                   "bytes_out": delta("pagemem_swap_bytes_total", direction="out"),
                   **{f"peak_{k}": v for k, v in peaks.items()}},
    }


def breakaway(rows: list[dict], factor: float) -> dict:
    """The lowest rate whose p50 TTFT or p99 TPOT passed ``factor`` times the lowest rate's."""
    base = rows[0]
    for row in rows[1:]:
        for metric, stat in (("ttft_ms", "p50"), ("tpot_ms", "p99")):
            a, b = row[metric][stat], base[metric][stat]
            if a is not None and b and a > factor * b:
                return {"rate": row["rate"], "by": f"{metric} {stat}", "value": a, "lowest_rate_value": b}
    return {"rate": None, "by": f"no rate passed {factor}x the lowest rate's p50 TTFT or p99 TPOT"}


def table(rows: list[dict]) -> str:
    head = (f"{'rate':>6} {'done':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'TPOT p99':>9} {'preempt':>8} {'pages out':>9} {'peak run/wait':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t, p, s = r["ttft_ms"], r["tpot_ms"], r["server"]
        lines.append(f"{r['rate']:>6} {r['completed']:>5} {r['request_throughput']:>7.2f} {r['output_throughput']:>10.1f} "
                     f"{_ms(t['p50'])} {_ms(t['p99'])} {_ms(p['p50'])} {_ms(p['p99'])} "
                     f"{s['preemptions_swap'] + s['preemptions_recompute']:>8.0f} {s['pages_out']:>9.0f} "
                     f"{s['peak_running']:>6.0f}/{s['peak_waiting']:<7.0f}")
    return "\n".join(lines) + "\n(TTFT, TPOT in ms)"


def _ms(x) -> str:
    return f"{x:>9.1f}" if x is not None else f"{'n/a':>9}"


def serve_flags(args, reqs) -> list[str]:
    longest = max(len(p) + m for p, m in reqs)
    flags = ["--model", args.model, "--device", args.device, "--max-model-len", str(max(2048, longest)),
             "--max-waiting", str(max(1024, args.num_prompts)), "--log-level", "warning"]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    return flags + shlex.split(args.server_args)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    reqs = workload(args)
    server = None
    if args.url is None:
        log = (args.json.with_suffix(".server.log") if args.json else Path(tempfile.mkdtemp()) / "server.log")
        server = ServerProcess(serve_flags(args, reqs), log, startup_timeout=900).start()
    url = args.url or server.url
    try:
        model = httpx2.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(run_rate(url, model, reqs[:2], math.inf, args, _NoBar()))      # warm-up, not reported
        rows = []
        for rate in rates:
            with tqdm(total=len(reqs), desc=f"rate {rate:g}", unit="req", disable=args.no_progress) as bar:
                rows.append(asyncio.run(run_rate(url, model, reqs, rate, args, bar)))
    finally:
        if server is not None:
            server.stop()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": device_name(), "model": model, "args": {k: str(v) for k, v in vars(args).items()},
              "server_flags": serve_flags(args, reqs) if args.url is None else None,
              "rates": rows, "breakaway": breakaway(rows, args.breakaway_factor)}
    print(table(rows))
    print(f"breakaway: {result['breakaway']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


class _NoBar:
    def update(self, n: int) -> None:
        pass


if __name__ == "__main__":
    main()
