"""Request traces: what arrives when, how long its prompt is, how many tokens it asks for.

A trace is a list of ``TraceRequest`` in arrival order, stored as JSONL, one request a line:

    {"arrival_s": 0.0, "prompt_len": 161, "output_len": 338}
    {"arrival_s": 0.12, "prompt_len": 40, "output_len": 9, "prefix_group": 2, "prefix_len": 32, "priority": 1}

``prefix_group`` (optional, with ``prefix_len``) says the first ``prefix_len`` prompt tokens are
the group's shared prefix (a system prompt, a few-shot preamble), the rest the request's own.
``PromptSource`` turns a trace into token ids, in order: group prefixes fixed by the group,
suffixes drawn from one seeded generator, so a replay through the prefix cache shares exactly
the pages the groups share.

Synthetic traces (``synthetic_trace``) draw lengths with the statistics the PagedAttention paper
(Kwon et al., SOSP 2023, Fig. 11) reports for its two datasets, Poisson arrivals at a given rate,
and a prefix-sharing mix; see ``lognormal_lengths`` for the shape chosen and why.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

_PREFIX_BLOCK = 256
_OMITTED = {"prefix_group": None, "prefix_len": 0, "priority": 0}   # optional fields left out at these values
_FIELDS = ("arrival_s", "prompt_len", "output_len", "prefix_group", "prefix_len", "priority")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. ``prefix_len`` leading prompt tokens belong to ``prefix_group``."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_group: int | None = None
    prefix_len: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.arrival_s, bool) or not isinstance(self.arrival_s, (int, float)) \
                or not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        for name in ("prompt_len", "output_len"):
            _check_int(getattr(self, name), name, 1)
        _check_int(self.prefix_len, "prefix_len", 0)
        _check_int(self.priority, "priority", None)
        if self.prefix_group is None:
            if self.prefix_len:
                raise ValueError(f"prefix_len={self.prefix_len} needs a prefix_group")
        else:
            _check_int(self.prefix_group, "prefix_group", 0)
            if not 1 <= self.prefix_len <= self.prompt_len:
                raise ValueError(f"prefix_len must be in [1, prompt_len={self.prompt_len}] with a "
                                 f"prefix_group, got {self.prefix_len}")


def _check_int(value, name: str, low: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


# ---- files ------------------------------------------------------------------------------------
def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace. Raises ValueError naming the line and field of the first bad entry,
    FileNotFoundError for a missing file. Arrivals must not decrease."""
    path = Path(path)
    out: list[TraceRequest] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(_parse_line(line, f"{path}:{lineno}"))
            if len(out) > 1 and out[-1].arrival_s < out[-2].arrival_s:
                raise ValueError(f"{path}:{lineno}: arrival_s {out[-1].arrival_s} comes before the "
                                 f"previous line's {out[-2].arrival_s}: a trace is in arrival order")
    if not out:
        raise ValueError(f"{path}: the trace is empty")
    return out


def _parse_line(line: str, where: str) -> TraceRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    unknown = set(record) - set(_FIELDS)
    missing = {"arrival_s", "prompt_len", "output_len"} - set(record)
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"unknown fields {sorted(unknown)}"] if unknown else []) +
            ([f"missing fields {sorted(missing)}"] if missing else [])))
    try:
        return TraceRequest(**record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def save_trace(path: str | Path, trace: Iterable[TraceRequest]) -> None:
    """Write a trace as JSONL, one request a line, optional fields only when set."""
    with Path(path).open("w") as f:
        for r in trace:
            d = {k: v for k, v in asdict(r).items() if v != _OMITTED.get(k, ())}
            f.write(json.dumps(d) + "\n")


# ---- length distributions ---------------------------------------------------------------------
class LengthStats(NamedTuple):
    """Mean prompt and output lengths (tokens) of a dataset, and the lognormal shape parameters."""

    mean_prompt: float
    mean_output: float
    sigma_prompt: float
    sigma_output: float


# Means from Kwon et al. (SOSP 2023), Fig. 11: ShareGPT has 8.4x longer prompts and 5.8x longer
# outputs than Alpaca on average, with higher variance. The sigmas are ours (the paper plots the
# histograms but gives no spread): ShareGPT's conversations spread over two orders of magnitude,
# Alpaca's instructions are short and narrow.
DATASETS: dict[str, LengthStats] = {
    "sharegpt": LengthStats(161.0, 338.0, 1.0, 1.0),
    "alpaca": LengthStats(19.0, 58.0, 0.6, 0.8),
}
MAX_PROMPT_LEN = 1024     # caps: prompt + output stay within the 2048-token context the paper serves
MAX_OUTPUT_LEN = 1024


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, max_len: int) -> np.ndarray:
    """``n`` lengths in [1, max_len] ([n] int64) whose expected value is ``mean``.

    Shape: lognormal, clipped to [1, max_len] and rounded. Why lognormal: lengths of human
    prompts and model replies are positive and right-skewed with a long tail (most are short,
    a few are very long), as the paper's histograms show for both datasets; a lognormal has that
    shape with two parameters, so the mean can be matched exactly and the spread chosen. mu is
    solved (bisection on the closed form of E[min(X, max_len)]) so that clipping keeps the mean.
    """
    if not 1 <= mean < max_len:
        raise ValueError(f"mean must be in [1, max_len={max_len}), got {mean}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    mu = _solve_mu(mean, sigma, max_len)
    x = rng.lognormal(mu, sigma, n)
    return np.clip(np.rint(x), 1, max_len).astype(np.int64)


def _clipped_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    log_cap = math.log(cap)
    return (math.exp(mu + sigma ** 2 / 2) * phi((log_cap - mu - sigma ** 2) / sigma)
            + cap * (1.0 - phi((log_cap - mu) / sigma)))


def _solve_mu(mean: float, sigma: float, cap: float) -> float:
    lo, hi = -20.0, math.log(cap) + 10 * sigma
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _clipped_mean(mid, sigma, cap) < mean else (lo, mid)
    return 0.5 * (lo + hi)


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Arrival times ([n] float64, seconds, from 0) of a Poisson process of ``rate`` requests/s;
    ``rate=inf`` puts every request at 0 (a batch, as ``pagemem run`` serves)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf for all at once), got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic_trace(num_requests: int, dataset: str = "sharegpt", rate: float = math.inf, seed: int = 0, *,
                    prefix_share: float = 0.0, num_prefix_groups: int = 4, prefix_len: int = 64) -> list[TraceRequest]:
    """A seeded trace: lengths from ``DATASETS[dataset]``, Poisson arrivals at ``rate``, and a
    prefix-sharing mix: a share ``prefix_share`` of requests starts with one of
    ``num_prefix_groups`` shared prefixes of ``prefix_len`` tokens, put before their own prompt
    (a system prompt), chosen uniformly."""
    _check_int(num_requests, "num_requests", 1)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if not 0.0 <= prefix_share <= 1.0:
        raise ValueError(f"prefix_share must be in [0, 1], got {prefix_share}")
    _check_int(num_prefix_groups, "num_prefix_groups", 1)
    _check_int(prefix_len, "prefix_len", 1)
    stats = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, num_requests, stats.mean_prompt, stats.sigma_prompt, MAX_PROMPT_LEN)
    outputs = lognormal_lengths(rng, num_requests, stats.mean_output, stats.sigma_output, MAX_OUTPUT_LEN)
    arrivals = poisson_arrivals(rng, num_requests, rate)
    shared = rng.random(num_requests) < prefix_share
    groups = rng.integers(0, num_prefix_groups, num_requests)
    return [TraceRequest(float(t), int(p) + (prefix_len if s else 0), int(o),
                         int(g) if s else None, prefix_len if s else 0)
            for t, p, o, s, g in zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), shared.tolist(),
                                     groups.tolist())]


def trace_from_prompts(prompts: Sequence[Sequence[int]], output_lens: Sequence[int]) -> list[TraceRequest]:
    """A trace of given prompts, all arriving at 0 (the prompts themselves go to the simulator)."""
    return [TraceRequest(0.0, len(p), int(n)) for p, n in zip(prompts, output_lens)]


# ---- token ids --------------------------------------------------------------------------------
class PromptSource:
    """Token ids for a trace's prompts, in trace order (one call per request, in order).

    A group's prefix is the same tokens for every request of the group (drawn from the group
    number and ``seed``); a request's own tokens come from one generator seeded by ``seed``, so
    two replays of a trace see the same ids. Ids are in [0, vocab_size).
    """

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        _check_int(vocab_size, "vocab_size", 2)
        self.vocab_size, self.seed = int(vocab_size), seed
        self._rng = np.random.default_rng(seed)
        self._prefixes: dict[int, list[int]] = {}

    def __call__(self, r: TraceRequest) -> list[int]:
        head = self._prefix(r.prefix_group, r.prefix_len) if r.prefix_group is not None else []
        return head + self._rng.integers(0, self.vocab_size, r.prompt_len - len(head)).tolist()

    def _prefix(self, group: int, n: int) -> list[int]:
        have = self._prefixes.setdefault(group, [])
        while len(have) < n:   # blocks of a fixed seed each: the same tokens whatever the order of asks
            block = np.random.default_rng([self.seed, group, len(have) // _PREFIX_BLOCK])
            have += block.integers(0, self.vocab_size, _PREFIX_BLOCK).tolist()
        return have[:n]

    def prompts(self, trace: Iterable[TraceRequest]) -> Iterator[list[int]]:
        for r in trace:
            yield self(r)


__all__ = ["DATASETS", "LengthStats", "PromptSource", "TraceRequest", "load_trace", "lognormal_lengths",
           "poisson_arrivals", "save_trace", "synthetic_trace", "trace_from_prompts"]
