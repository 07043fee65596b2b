"""Trace-driven simulation of the engine's scheduling on the CPU: no model, no GPU, no K/V data.

A ``Simulator`` replays a trace (``pagemem.traces``) through the real ``Scheduler``,
``PagePool``, ``PrefixCache``, eviction policy, ``Preemptor`` and ``HostSwap`` (NumPy backend),
in the order ``LLM.step`` calls them (pagemem/models/engine.py):

    1. requests whose last token is in flight are retired (async scheduling);
    2. ``schedule()``; the step is "launched": ``advance()`` with the rows that sample;
    3. the previous step's ids are taken in (``resolve``, retire at max_tokens): with async
       scheduling one step late, as the engine's greedy rows are; without, at once.

So the rows, preemptions, swaps, resumes and finishes of each step are the engine's, for
requests that end at their ``output_len`` (``ignore_eos``, no stop tokens, as ``pagemem run``
serves). Sampled ids are a constant: only lengths and prompt ids matter to scheduling. The pool
holds one float16 K and V a slot (one layer, one head of size 1: 4 bytes a slot, not the model's
K/V), which the swap bookkeeping moves through the real HostSwap. Time is the ``StepModel``'s:
each step costs its decode, prefill and swap time at the model's real page bytes; a step's ids
are known when it ends, and requests join when the clock passes their arrival.
"""
from __future__ import annotations

import bisect
import json
import math
import operator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

from pagemem.config import PoolConfig
from pagemem.pool import PagePool
from pagemem.preemption import check_mode
from pagemem.prefix_cache import PrefixCache
from pagemem.scheduler import Request, Scheduler, ScheduledStep, Status
from pagemem.swap import HostSwap
from pagemem.traces import PromptSource, TraceRequest

SIM_TOKEN = 0   # the id every simulated row samples
_PAGES, _TABLE, _TOKENS = (operator.attrgetter(a) for a in ("pages", "page_table", "num_tokens"))


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The engine's settings the simulator honours (``LLM``'s arguments of the same names).
    ``swap_space`` is GiB of host memory at the step model's page bytes."""

    num_pages: int
    page_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    preemption: str = "recompute"
    eviction: str = "lru"
    enable_prefix_caching: bool = False
    watermark: float = 0.01
    admit_batch: int = 1
    async_scheduling: bool = True
    swap_space: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) \
                or self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {self.page_size!r}")
        if not (isinstance(self.swap_space, (int, float)) and 0 <= self.swap_space < math.inf):
            raise ValueError(f"swap_space must be a finite number of GiB >= 0, got {self.swap_space!r}")
        if check_mode(self.preemption, "preemption") != "recompute" and self.swap_space == 0:
            raise ValueError(f"preemption={self.preemption!r} needs swap_space > 0")


@dataclass(frozen=True)
class StepModel:
    """Seconds one engine step takes on one GPU, as ``pagemem calibrate`` measures them.

    decode: a grid of decode-only step times over batch size and mean context per sequence,
    interpolated bilinearly (extrapolated linearly outside it); prefill: ``overhead + tokens /
    rate``; swap: bytes over the pinned PCIe bandwidth of each direction. A step of decode and
    prefill rows costs the sum (the engine runs the two kinds of rows in separate passes).
    """

    decode_batch: tuple[int, ...]              # [B] batch sizes, increasing
    decode_context: tuple[int, ...]            # [C] mean context tokens a sequence, increasing
    decode_s: tuple[tuple[float, ...], ...]    # [B][C] seconds of a decode-only step
    prefill_tokens_per_s: float
    prefill_overhead_s: float
    pcie_out_gb_per_s: float                   # device to host
    pcie_in_gb_per_s: float                    # host to device
    kv_bytes_per_token: int                    # K and V of every layer, the model's dtype
    meta: dict = field(default_factory=dict, compare=False)   # model, device, date: not used

    def __post_init__(self) -> None:
        for name in ("decode_batch", "decode_context"):
            axis = getattr(self, name)
            if not axis or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in axis) \
                    or list(axis) != sorted(set(axis)):
                raise ValueError(f"{name} must be increasing ints >= 1, got {axis!r}")
        grid = self.decode_s
        if len(grid) != len(self.decode_batch) or any(len(row) != len(self.decode_context) for row in grid):
            raise ValueError(f"decode_s must be [{len(self.decode_batch)}][{len(self.decode_context)}] "
                             f"(decode_batch x decode_context)")
        for name, v in [("decode_s", x) for row in grid for x in row] + [
                (n, getattr(self, n)) for n in ("prefill_tokens_per_s", "pcie_out_gb_per_s", "pcie_in_gb_per_s")]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        if not 0 <= self.prefill_overhead_s < math.inf:
            raise ValueError(f"prefill_overhead_s must be finite and >= 0, got {self.prefill_overhead_s!r}")
        if isinstance(self.kv_bytes_per_token, bool) or not isinstance(self.kv_bytes_per_token, int) \
                or self.kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token must be an int >= 1, got {self.kv_bytes_per_token!r}")
        # The grid with an axis of one point widened to two equal ones, so lookups need no cases.
        widen = lambda xs, nxt: list(xs) if len(xs) > 1 else [xs[0], nxt(xs[0])]  # noqa: E731
        rows = [widen(row, float) for row in grid]
        object.__setattr__(self, "_grid", (widen(self.decode_batch, lambda v: v + 1),
                                           widen(self.decode_context, lambda v: v + 1), widen(rows, list)))

    @classmethod
    def from_dict(cls, d: dict) -> StepModel:
        """From ``to_dict()``'s form (the JSON ``pagemem calibrate`` writes). ValueError names a
        missing or unknown key."""
        if not isinstance(d, dict):
            raise ValueError(f"a step model is a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing, unknown = names - {"meta"} - set(d), set(d) - names
        if missing or unknown:
            raise ValueError(f"step model: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        d = dict(d, decode_batch=tuple(d["decode_batch"]), decode_context=tuple(d["decode_context"]),
                 decode_s=tuple(tuple(row) for row in d["decode_s"]))
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def load(cls, path: str | Path) -> StepModel:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def decode_seconds(self, num_seqs: int, context_tokens: int) -> float:
        """A decode-only step of ``num_seqs`` rows reading ``context_tokens`` cached tokens in all."""
        b, c, g = self._grid
        i, u = _cell(b, num_seqs)
        j, v = _cell(c, context_tokens / num_seqs)
        lo, hi = g[i], g[i + 1]
        lo, hi = lo[j] + v * (lo[j + 1] - lo[j]), hi[j] + v * (hi[j + 1] - hi[j])
        return max(lo + u * (hi - lo), 0.0)

    def step_seconds(self, num_decode: int, decode_context_tokens: int, prefill_tokens: int) -> float:
        t = self.decode_seconds(num_decode, decode_context_tokens) if num_decode else 0.0
        if prefill_tokens:
            t += self.prefill_overhead_s + prefill_tokens / self.prefill_tokens_per_s
        return t

    def swap_seconds(self, pages_out: int, pages_in: int, page_size: int) -> float:
        nbytes = self.kv_bytes_per_token * page_size
        return (pages_out * nbytes / self.pcie_out_gb_per_s + pages_in * nbytes / self.pcie_in_gb_per_s) * 1e-9


def _cell(axis: list[int], x: float) -> tuple[int, float]:
    """(i, u): x = axis[i] + u * (axis[i + 1] - axis[i]), i clamped so u extrapolates past the ends."""
    i = min(max(bisect.bisect_right(axis, x) - 1, 0), len(axis) - 2)
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


class SimStep(NamedTuple):
    """The pool after one step (the fields of the engine's StepRecord, and the prefill tokens)."""

    t: float
    seconds: float
    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int   # tokens of rows that compute tokens whose successor is known, or prompt tokens
    num_used: int
    fragmentation: float
    num_kv_tokens: int        # tokens in the running requests' pages
    num_cached: int
    num_running: int
    num_waiting: int
    num_swapped: int
    pages_out: int            # cumulative
    pages_in: int


class SimOutput(NamedTuple):
    """One finished request; times in simulated seconds from its arrival."""

    request_id: int
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float
    tpot_s: float | None      # None with a single output token
    num_preemptions: int
    num_cached_tokens: int


class StepDecision(NamedTuple):
    """What one ``Simulator.step()`` decided, by request id (``record_decisions=True``)."""

    ran: tuple[tuple[int, int], ...]        # (id, query_len) in row order
    preempted: tuple[tuple[int, str], ...]  # (id, "swap" | "recompute")
    resumed: tuple[int, ...]
    demoted: tuple[int, ...]                # swapped requests turned into recompute preemptions
    finished: tuple[int, ...]


@dataclass(slots=True, eq=False)
class _Flight:
    step: ScheduledStep
    sampled: list[Request]
    done_t: float
    seconds: float
    prefill: int             # tokens of prefill rows (SimStep.num_prefill_tokens)


class _ModelledSwap(HostSwap):
    """HostSwap whose achieved bandwidth, read by "auto"'s cost model, is the step model's PCIe
    figure (rescaled to this pool's tiny pages, so that pages x page_bytes / bandwidth gives the
    modelled seconds). Everything else, slots, tickets and reclaim, is HostSwap's own."""

    def __init__(self, pool: PagePool, num_host_pages: int, model: StepModel, page_size: int) -> None:
        super().__init__(pool, num_host_pages)
        scale = pool.config.page_bytes / (model.kv_bytes_per_token * page_size)
        self._modelled = {"out": model.pcie_out_gb_per_s * 1e9 * scale, "in": model.pcie_in_gb_per_s * 1e9 * scale}

    def bandwidth(self, direction: str) -> float | None:
        return self._modelled[direction] if super().bandwidth(direction) is not None else None


@dataclass(slots=True)
class SimResult:
    """A finished simulation. ``pool``, ``swap``, ``prefix_cache`` and ``scheduler`` are the real
    objects the trace ran through (read-only after the run)."""

    config: SimConfig
    step_model: StepModel
    steps: list[SimStep]
    outputs: list[SimOutput]
    elapsed_s: float
    pool: PagePool
    swap: HostSwap | None
    prefix_cache: PrefixCache | None
    scheduler: Scheduler
    decisions: list[StepDecision] = field(default_factory=list)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of the modelled K/V (the step model's, not the simulator's pool)."""
        return self.step_model.kv_bytes_per_token * self.config.page_size


class Simulator:
    """Replays ``trace`` under ``config``, timed by ``step_model``. ``prompts`` gives the token ids
    of each request, in trace order (a PromptSource over ``vocab_size`` by default).
    Owns its pool, swap, prefix cache and scheduler; ``run()`` once."""

    def __init__(self, trace: Sequence[TraceRequest], step_model: StepModel, config: SimConfig, *,
                 prompts: Callable[[TraceRequest], list[int]] | Iterable[list[int]] | None = None,
                 vocab_size: int = 32_000, seed: int = 0, record_decisions: bool = False) -> None:
        if not isinstance(step_model, StepModel):
            raise TypeError(f"step_model must be a StepModel, got {type(step_model).__name__}")
        if not isinstance(config, SimConfig):
            raise TypeError(f"config must be a SimConfig, got {type(config).__name__}")
        self.trace, self.model, self.config = list(trace), step_model, config
        if not self.trace:
            raise ValueError("trace is empty")
        self._check_fits()
        c = config
        self.pool = PagePool(PoolConfig(c.num_pages, c.page_size, 1, 1, 1, "float16", "cpu"), c.eviction)
        page_bytes = step_model.kv_bytes_per_token * c.page_size
        self.swap = _ModelledSwap(self.pool, max(int(c.swap_space * 2**30), page_bytes) // page_bytes,
                                  step_model, c.page_size) if c.swap_space > 0 else None
        self.prefix_cache = PrefixCache(self.pool, root="simulated") if c.enable_prefix_caching else None
        self.scheduler = Scheduler(self.pool, max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                                   preemption=c.preemption, swap=self.swap, prefix_cache=self.prefix_cache,
                                   watermark=c.watermark, admit_batch=c.admit_batch)
        if prompts is None:
            prompts = PromptSource(vocab_size, seed)
        elif isinstance(prompts, (list, tuple)):
            bad = next((i for i, (p, r) in enumerate(zip(prompts, self.trace)) if len(p) != r.prompt_len), None)
            if len(prompts) != len(self.trace) or bad is not None:
                raise ValueError(f"prompts: {len(prompts)} prompts for {len(self.trace)} requests"
                                 + (f"; prompt {bad} has {len(prompts[bad])} tokens, the trace says "
                                    f"{self.trace[bad].prompt_len}" if bad is not None else ""))
        self._prompts = prompts if callable(prompts) else iter(prompts).__next__
        self._takes_request = callable(prompts)
        self.record_decisions = record_decisions
        self.clock = 0.0
        self._next = 0                     # index of the next trace request to arrive
        self._inflight: _Flight | None = None
        n = len(self.trace)
        self._first_t: list[float | None] = [None] * n
        self._outputs: list[SimOutput | None] = [None] * n
        self.steps: list[SimStep] = []
        self.decisions: list[StepDecision] = []
        self._finished_now: list[int] = []

    def _check_fits(self) -> None:
        """Every request must fit the pool alone, as Scheduler.add checks; raised before any step."""
        ps, usable = self.config.page_size, self.config.num_pages - 1
        for i, r in enumerate(self.trace):
            if not isinstance(r, TraceRequest):
                raise TypeError(f"trace[{i}] must be a TraceRequest, got {type(r).__name__}")
            if -(-(r.prompt_len + r.output_len) // ps) > usable:
                raise ValueError(f"trace[{i}] needs {-(-(r.prompt_len + r.output_len) // ps)} pages for "
                                 f"{r.prompt_len} prompt + {r.output_len} output tokens; the pool has {usable}")

    # ---- the run ------------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        """Serve every request of the trace; ``progress(n)`` is called with requests finished."""
        if self._next:
            raise RuntimeError("run() was already called on this Simulator")
        sched = self.scheduler
        while self._next < len(self.trace) or sched.has_unfinished() or self._inflight is not None:
            if not sched.has_unfinished() and self._inflight is None:
                self.clock = max(self.clock, self.trace[self._next].arrival_s)   # idle until the next arrival
            self._arrive()
            done = self.step()
            if progress is not None and done:
                progress(done)
        outputs = [o for o in self._outputs if o is not None]
        return SimResult(self.config, self.model, self.steps, outputs, self.clock, self.pool, self.swap,
                         self.prefix_cache, sched, self.decisions)

    def _arrive(self) -> None:
        trace, sched = self.trace, self.scheduler
        while self._next < len(trace) and trace[self._next].arrival_s <= self.clock:
            r = trace[self._next]
            ids = self._prompts(r) if self._takes_request else self._prompts()
            sched.add(self._next, ids, r.output_len, r.priority)
            self._next += 1

    def step(self) -> int:
        """One engine step (see the module docstring). Returns how many requests finished."""
        sched, prev = self.scheduler, self._inflight
        self._finished_now = []
        if prev is not None:
            for req in prev.sampled:     # num_output_tokens, inlined: once per row a step
                if len(req.token_ids) + req.num_pending - req.num_prompt_tokens >= req.max_tokens \
                        and req.status is Status.RUNNING:
                    sched.finish(req)
        before = {r: r.num_demotions for r in sched.swapped} if self.record_decisions else None
        sw = self.swap
        out0, in0 = (sw.num_pages_out, sw.num_pages_in) if sw is not None else (0, 0)
        step = sched.schedule() if sched.has_unfinished() else None
        if step is not None and not step.requests and prev is None:
            raise RuntimeError(f"no request could be scheduled: {self.pool.num_free_pages} free pages, "
                               f"{len(sched.waiting)} waiting, {len(sched.swapped)} swapped")
        swap_s = self.model.swap_seconds(sw.num_pages_out - out0, sw.num_pages_in - in0, self.config.page_size) \
            if sw is not None else 0.0
        cur = None
        if step is not None and step.requests:
            cur = self._launch(step, swap_s)
        else:
            self.clock += swap_s
        finished = self._take_in(prev) if prev is not None else 0
        self._inflight = cur
        if cur is not None and not self.config.async_scheduling:
            finished += self._take_in(cur)
            self._inflight = None
        if self.record_decisions:
            self._decide(step, before)
        return finished

    def _launch(self, step: ScheduledStep, swap_s: float) -> _Flight:
        """Time the step and report it advanced; rows reaching their last token sample."""
        sampled, num_decode, decode_ctx = [], 0, 0
        for req, n in zip(step.requests, step.query_lens):   # once per row a step: plain operations
            ctx = req.pages.num_tokens
            if ctx == len(req.token_ids) + req.num_pending:    # the chunk reaches the last token
                sampled.append(req)
                if n == 1 and ctx > req.num_prompt_tokens:      # a decode row (Scheduler.schedule)
                    num_decode += 1
                    decode_ctx += ctx
        prefill = step.num_tokens - num_decode
        seconds = self.model.step_seconds(num_decode, decode_ctx, prefill) + swap_s
        self.scheduler.advance(step, sampled)
        self.clock += seconds
        return _Flight(step, sampled, self.clock, seconds, prefill)

    def _take_in(self, cur: _Flight) -> int:
        """The step's ids reach the host when it ends: append them, retire requests at their
        max_tokens, feed "auto" its prefill rate as the engine does, record the step."""
        sched, first, now = self.scheduler, self._first_t, cur.done_t
        sched.resolve(dict.fromkeys(cur.sampled, SIM_TOKEN))
        finished = 0
        for req in cur.sampled:
            rid = req.request_id
            if first[rid] is None:
                first[rid] = now
            num_out = len(req.token_ids) - req.num_prompt_tokens
            if num_out >= req.max_tokens:
                if req.status is not Status.FINISHED:
                    sched.finish(req)
                self._retire(req, now)
                finished += 1
        step = cur.step
        if step.num_tokens >= 4 * len(step.requests) and cur.seconds > 0:
            sched.preemptor.set_prefill_rate(step.num_tokens / cur.seconds)
        self._record(cur)
        return finished

    def _retire(self, req: Request, now: float) -> None:
        rid, first = req.request_id, self._first_t[req.request_id]
        n_out = len(req.token_ids) - req.num_prompt_tokens
        arrival = self.trace[rid].arrival_s
        tpot = (now - first) / (n_out - 1) if n_out > 1 else None
        self._outputs[rid] = SimOutput(rid, req.num_prompt_tokens, n_out, first - arrival, tpot,
                                       req.num_preemptions, req.num_cached_tokens)
        self._finished_now.append(rid)

    def _record(self, cur: _Flight) -> None:
        """The pool after the step, as the engine's StepRecord (counts read off the pool itself)."""
        sched, sw, pool = self.scheduler, self.swap, self.pool
        seqs = list(map(_PAGES, sched.running))     # PagePool.stats(seqs)'s fragmentation, in C loops
        slots = sum(map(len, map(_TABLE, seqs))) * self.config.page_size
        tokens = sum(map(_TOKENS, seqs))
        frag = (slots - tokens) / slots if slots else 0.0
        used = pool.num_pages - 1 - pool.num_free_pages
        self.steps.append(SimStep(
            cur.done_t, cur.seconds, len(cur.step.requests), cur.step.num_tokens, cur.prefill, used, frag, tokens,
            len(pool.policy), len(sched.running), len(sched.waiting), len(sched.swapped),
            sw.num_pages_out if sw else 0, sw.num_pages_in if sw else 0))

    def _decide(self, step: ScheduledStep | None, swapped_before: dict) -> None:
        """Record this step() call's decisions (an empty row list when nothing was scheduled)."""
        rows = tuple((r.request_id, n) for r, n in zip(step.requests, step.query_lens)) if step else ()
        preempted = tuple((r.request_id, m) for r, m in step.preempted) if step else ()
        resumed = tuple(r.request_id for r in step.resumed) if step else ()
        demoted = sorted(r.request_id for r, n in swapped_before.items() if r.num_demotions > n)
        self.decisions.append(StepDecision(rows, preempted, resumed, tuple(demoted), tuple(sorted(self._finished_now))))
