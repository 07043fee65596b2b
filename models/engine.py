"""LLM: continuous batching over the page pool, with swap or recompute preemption.

The engine wires the pieces together and owns none of their rules: the Scheduler (pagemem)
decides who runs and who is preempted; the model computes logits for the tokens it is given;
the sampler picks tokens. Each step: schedule -> pack_batch -> forward -> sample -> update.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pagemem.models.cuda_graph import TokenFeed
from pagemem.models.model import Model, load_model
from pagemem import kernels
from pagemem.models.sampling import SEED_LIMIT, SamplingParams, pack_rows, request_seed, stop_reason
from pagemem import PagePool, PoolConfig, pack_batch
from pagemem.backend import resolve_device, to_dtype
from pagemem.config import check_fraction, check_int
from pagemem.eviction import make_policy
from pagemem.prefix_cache import PrefixCache
from pagemem.preemption import check_mode
from pagemem.scheduler import Request, Scheduler, Status
from pagemem.swap import HostSwap

CPU_POOL_BYTES = 1 << 30   # default pool size on the CPU, where free memory is not probed


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One generated token's log-probability and its position's most likely tokens (after
    temperature, before top-k/top-p/min-p), for requests with ``SamplingParams.logprobs``."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]   # (token id, logprob), most likely first


@dataclass(slots=True)
class RequestOutput:
    """One finished request: its tokens and how it was served."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float            # time to first token, from the start of generate()
    tpot_s: float            # mean time per output token after the first
    num_preemptions: int
    num_cached_tokens: int   # prompt tokens served by the prefix cache
    logprobs: list[TokenLogprobs] | None = None   # per generated token, when asked for


@dataclass(slots=True)
class StepRecord:
    """The pool after one step, for plots and summaries."""

    t: float
    seconds: float           # wall time since the previous step's ids came in (or since it began)
    num_seqs: int
    num_tokens: int
    num_used: int
    fragmentation: float     # empty slots in the running sequences' pages
    num_cached: int
    num_running: int
    num_waiting: int
    num_swapped: int
    pages_out: int           # cumulative pages swapped out
    pages_in: int
    num_prefill_tokens: int = 0   # tokens of rows still in their prompt (decode rows excluded)
    # host seconds of this step's parts: scheduling it, queuing its device work, and waiting for
    # its sampled ids (with async scheduling that wait comes after the next step is queued)
    schedule_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0


@dataclass(slots=True)
class _RequestState:
    """What the engine keeps of a request beside the scheduler's Request: how it samples and
    stops, its prompt text, its timings, why it finished and its log-probabilities."""

    params: SamplingParams
    seed: int                          # the request's draws depend on it and the position only
    prompt: str | None
    first_token_t: float | None = None
    done_t: float | None = None
    finish_reason: str = ""
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    steps: list[StepRecord] = field(default_factory=list)
    start_t: float = 0.0
    end_t: float = 0.0
    counters_at_start: dict[str, int] = field(default_factory=dict)


class LLM:
    """Generate text with continuous batching over a PagePool.

    ``model`` is a checkpoint folder, ``random:<preset>``, or a loaded Model. The pool takes
    ``num_pages`` pages, or on CUDA ``gpu_memory_utilization`` of the free memory after the
    weights (on the CPU, 1 GiB). ``swap_space`` GiB of host memory backs "swap" and "auto".
    On CUDA, decode-only steps replay captured CUDA graphs unless ``cuda_graph=False``.
    """

    def __init__(self, model: str | Model = "random:tiny", *, dtype: str | None = None, device: str = "auto",
                 page_size: int = 16, num_pages: int | None = None, gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4.0, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 preemption: str = "recompute", eviction: str = "lru", enable_prefix_caching: bool = False,
                 seed: int = 0, watermark: float = 0.01, cuda_graph: bool = True, admit_batch: int = 1,
                 async_scheduling: bool = True) -> None:
        page_size, num_pages, swap_space, max_num_seqs, max_num_batched_tokens, admit_batch, seed, watermark = \
            _check_engine_args(
                model, dtype, device, page_size, num_pages, gpu_memory_utilization, swap_space, max_num_seqs,
                max_num_batched_tokens, preemption, eviction, seed, watermark, admit_batch,
                dict(enable_prefix_caching=enable_prefix_caching, cuda_graph=cuda_graph, async_scheduling=async_scheduling))
        self.model = model if isinstance(model, Model) else load_model(model, dtype, device, seed)
        self.xp = self.model.xp
        self.pool = PagePool(default_pool_config(self.model, num_pages, page_size, gpu_memory_utilization), eviction)
        self.swap = HostSwap(self.pool, num_bytes=max(int(swap_space * 2**30), self.pool.config.page_bytes)) \
            if swap_space > 0 else None
        self.prefix_cache = PrefixCache(self.pool, root=self.model.name) if enable_prefix_caching else None
        self.stream = self.graphs = None
        if self.model.device == "cuda":
            import cupy as cp
            self.stream = cp.cuda.Stream(non_blocking=True)
            if cuda_graph:
                from pagemem.models.cuda_graph import DecodeGraphs
                self.graphs = DecodeGraphs(self.model, self.pool, self.stream, max_num_seqs)
        self.scheduler = Scheduler(self.pool, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, preemption=preemption,
                                   swap=self.swap, prefix_cache=self.prefix_cache, watermark=watermark,
                                   admit_batch=admit_batch, stream=self.stream)
        self.seed = seed
        self.async_scheduling = bool(async_scheduling)
        self._inflight: _StepInFlight | None = None
        self._last_collect_t = 0.0
        self._pinned_slot = 0
        self._pinned = None
        if self.stream is not None:      # two sets of pinned buffers: one per step in flight
            self._pinned = [_Pinned(max_num_seqs) for _ in range(2)]
        self.stats = EngineStats()
        self._states: dict[Request, _RequestState] = {}
        self._next_id = 0

    def warmup(self, max_context_len: int) -> None:
        """Start-up work before serving, as vLLM does: compile the prefill kernels of every score-row
        size up to ``max_context_len`` (one throwaway prompt each, two tokens generated) and
        capture the decode CUDA graphs, so no request pays for a compile. No-op on the CPU."""
        if self.model.device != "cuda":
            return
        pool_tokens = (self.pool.num_pages - 1) * self.pool.page_size
        limit = min(max_context_len, self.model.config.max_position_embeddings, pool_tokens) - 2
        lens = kernels.prefill_warmup_lengths(self.pool.layer_kv(0)[0], limit)
        next_id = self._next_id
        for n in lens:   # one at a time: together they would share prefill calls, hence variants
            self.generate([[0] * n], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        self._next_id = next_id   # request ids and default sampling seeds as if no warm-up ran
        self.capture_graphs(max_context_len)
        self.measure_costs()

    def measure_costs(self, num_tokens: int | None = None, num_pages: int | None = None) -> dict:
        """Start-up figures for "auto" preemption's cost model, measured on this engine (idle pool):
        prefill tokens/s of ``num_tokens`` throwaway prompt tokens (default: the token budget,
        within the context and the pool) in prompts of up to 1024 tokens, as a workload's (one long
        prompt would time long-context attention), timed on a second batch after a first one,
        set on the scheduler's Preemptor; and, with a HostSwap, two round trips of ``num_pages``
        scattered pages (default 64 MiB of pages, within half the free pool and the host pool)
        through it, whose event-timed copies give ``HostSwap.bandwidth`` its first figures. Every
        page goes back; request ids and seeds are as before. Returns the figures (bytes/s)."""
        pool, sw, ps = self.pool, self.swap, self.pool.page_size
        n = num_tokens or min(self.scheduler.max_num_batched_tokens, self.model.config.max_position_embeddings - 1,
                              (pool.num_pages - 2) * ps)
        k, vocab = min(n, 1024), self.model.config.vocab_size
        batch = lambda base: [[(base + i) % vocab] * k for i in range(max(1, n // k))]  # noqa: E731  distinct prompts
        params, next_id = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), self._next_id
        self.generate(batch(0), params)
        t0 = time.perf_counter()
        self.generate(batch(vocab // 2), params)
        rate = k * max(1, n // k) / (time.perf_counter() - t0)
        self._next_id = next_id
        self.scheduler.preemptor.set_prefill_rate(rate)
        out = {"prefill_tokens_per_s": rate, "swap_out_bytes_per_s": None, "swap_in_bytes_per_s": None}
        if sw is not None:
            k = num_pages or max(1, min((64 << 20) // pool.config.page_bytes, pool.num_free_pages // 2, sw.num_host_pages))
            got = pool.allocate(2 * k)
            pool.free(got[1::2])                 # every other page: scattered, as a sequence's pages are
            pages = got[::2]
            for _ in range(2):                   # the second round trip runs on warm buffers
                ticket = sw.swap_out(pages, self.stream)
                sw.wait(ticket)
                pages = sw.swap_in(ticket, self.stream)
                sw.reclaim(wait=True)
            pool.free(pages)
            out.update(swap_out_bytes_per_s=sw.bandwidth("out"), swap_in_bytes_per_s=sw.bandwidth("in"))
        return out

    def capture_graphs(self, max_context_len: int) -> None:
        """Capture the decode CUDA graphs for contexts up to ``max_context_len`` now (start-up),
        instead of on first use. No-op on the CPU or with cuda_graph=False."""
        if self.graphs is not None:
            with self.stream:
                self.graphs.capture_all(max_context_len)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams, priority: int = 0) -> Request:
        """Tokenize (if text), check it fits the model and the pool, and queue it."""
        text, ids = self._encode(prompt, params, priority)
        return self._queue(text, ids, params, priority)

    def _encode(self, prompt: str | Sequence[int], params: SamplingParams, priority: int) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, validated against the model and the pool; changes nothing."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.model.tokenizer.encode(prompt) if text is not None else _token_id_list(prompt)
        if not ids:
            raise ValueError("prompt is empty (no token ids)")
        limit = self.model.config.max_position_embeddings
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                             f"model's context of {limit} tokens")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        self.scheduler.check(self._next_id, ids, params.max_tokens, priority)
        return text, ids

    def _queue(self, text: str | None, ids: list[int], params: SamplingParams, priority: int) -> Request:
        req = self.scheduler.add(self._next_id, ids, params.max_tokens, priority)
        self._states[req] = _RequestState(params, request_seed(params, self.seed, self._next_id), text,
                                          logprobs=[] if params.logprobs is not None else None)
        self._next_id += 1
        return req

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order. Every prompt is checked before
        any is queued: a call that raises leaves the engine as it was."""
        if not isinstance(use_tqdm, (bool, np.bool_)):
            raise TypeError(f"use_tqdm must be a bool, got {type(use_tqdm).__name__} {use_tqdm!r}")
        prompts, plist = _prompt_list(prompts), _params_list(params)
        if plist is None:
            plist = [SamplingParams()] * len(prompts)
        elif len(plist) == 1 and isinstance(params, SamplingParams):
            plist = plist * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._encode(p, sp, 0) for p, sp in zip(prompts, plist)]   # all checked before any is queued
        reqs = [self._queue(text, ids, sp, 0) for (text, ids), sp in zip(encoded, plist)]
        self.stats = EngineStats(start_t=time.perf_counter(), counters_at_start=self.counters())
        bar = _progress(len(reqs), use_tqdm)
        try:
            while self.has_unfinished():
                bar.update(self.step())
        except BaseException:
            self._abort(reqs)            # the call's requests leave; the engine stays usable
            raise
        finally:
            bar.close()
        self.stats.end_t = time.perf_counter()
        return [self._output(r) for r in reqs]

    def abort(self, req: Request) -> None:
        """Retire ``req`` wherever it is (waiting, running, swapped): its pages go back to the
        pool now; a token of it still in flight is dropped when it arrives."""
        state = self._states.get(req)
        if state is None:
            raise ValueError(f"request {getattr(req, 'request_id', req)!r} is not in this engine")
        if req.status is not Status.FINISHED:
            self.scheduler.finish(req)
        if not state.finish_reason:
            state.finish_reason, state.done_t = "abort", time.perf_counter()

    def _abort(self, reqs: Sequence[Request]) -> None:
        """After a failed step: drop the step in flight (its ids never arrive) and retire reqs."""
        cur, self._inflight = self._inflight, None
        if cur is not None:
            try:
                self._collect(cur)       # other callers' requests keep their tokens
            except Exception:  # noqa: BLE001 -- the step itself is broken: its ids are lost
                self.scheduler.drop_pending(cur.sampled)
        for req in reqs:
            if req.status is not Status.FINISHED:
                self.scheduler.finish(req)
            self._states.pop(req, None)

    def chat(self, messages, params: SamplingParams | Sequence[SamplingParams] | None = None, **kwargs) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}`` messages) or to each of a
        list of conversations, rendered through the model's chat template; outputs in order.
        See ``pagemem.models.chat.chat`` for the keyword arguments."""
        from pagemem.models.chat import chat
        return chat(self, messages, params, **kwargs)

    # ---- one step -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Requests queued, running or swapped, or a step whose tokens have not come back yet."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    def step(self) -> int:
        """Schedule and queue one model step, then take in the tokens of the step before it.
        Returns how many requests finished.

        With ``async_scheduling`` a greedy step's sampled ids stay on the device: the next step
        is scheduled and queued while the GPU works, its decode rows read those ids on the
        device, and the ids reach the host one step later. A request that stops on a sampled
        id (EOS, a stop token) then runs one extra row whose token is dropped; one that reaches
        max_tokens is retired before the next schedule. Anything else (sampling with a
        temperature) is taken in before the next step, as without ``async_scheduling``.
        """
        t0 = time.perf_counter()
        finished = 0
        prev = self._inflight
        if prev is not None:     # ids in flight that are their request's last: no further step
            for req in prev.sampled:
                if req.status is Status.RUNNING and req.num_output_tokens >= req.max_tokens:
                    self.scheduler.finish(req)
        step = self.scheduler.schedule() if self.scheduler.has_unfinished() else None
        if step is not None and not step.requests and prev is None:
            raise RuntimeError(f"no request could be scheduled: {self.pool.num_free_pages} free pages, "
                               f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.swapped)} swapped")
        cur = None
        if step is not None and step.requests:
            t1 = time.perf_counter()
            cur = self._launch(step, prev, t0)
            cur.schedule_s, cur.launch_s = t1 - t0, time.perf_counter() - t1
        if prev is not None:
            finished += self._collect(prev)
        self._inflight = cur
        if cur is not None and not cur.collect_later:
            finished += self._collect(cur)
            self._inflight = None
        return finished

    def _launch(self, step, prev: _StepInFlight | None, t0: float) -> _StepInFlight:
        """Queue the step's forward and sampling on the engine's stream; report it to the
        scheduler as advanced. Decode rows whose last token is still in flight read its id
        from ``prev``'s device tokens."""
        tokens, positions = _inputs(step.requests, step.query_lens)
        feed = _feed_rows(step.requests, prev)           # rows reading their token on the device, or None
        seqs = [r.pages for r in step.requests]
        rows = [i for i, r in enumerate(step.requests) if r.pages.num_tokens == r.num_tokens]
        sampled = [step.requests[i] for i in rows]
        # [NUM_FIELDS, num_seqs] int32: each row's sampling settings, seed and drawn position (rows
        # that do not sample this step, mid-prompt chunks, get greedy settings and are ignored)
        packed = np.zeros((kernels.NUM_FIELDS, len(seqs)), dtype=np.int32)
        if rows:
            states = [self._states[r] for r in sampled]
            packed[:, rows] = pack_rows([x.params for x in states], [x.seed for x in states], [r.num_tokens for r in sampled])
        # Every device operation of the step (batch upload, forward, sampling) runs on one stream.
        with self.stream if self.stream is not None else contextlib.nullcontext():
            logits, graph_ids = self._forward(tokens, positions, seqs, step.query_lens, feed, packed)
            cur = _StepInFlight(step, sampled, t0)
            self._sample(cur, logits, rows, packed, graph_ids)
        self.scheduler.advance(step, sampled)
        return cur

    def _forward(self, tokens: np.ndarray, positions: np.ndarray, seqs, lens: list[int], feed: TokenFeed | None,
                 packed):
        """(logits [num_seqs, V], drawn ids [num_seqs] or None). Decode rows (packed first) replay
        a CUDA graph, which also draws their ids under ``packed[:, :nd]``, when one is available;
        the rest, or everything without graphs, run eagerly (and the ids are drawn after)."""
        nd = next((i for i, q in enumerate(lens) if q != 1), len(lens))
        head = None
        if nd and self.graphs is not None and self.graphs.can_run(seqs[:nd], lens[:nd]):
            head_feed = None if feed is None else feed.select(feed.rows < nd)
            head = self.graphs.run(tokens[:nd], positions[:nd], seqs[:nd], head_feed, packed[:, :nd])
        if head is None:
            nd = 0
        if nd == len(lens):
            return head
        batch = pack_batch(seqs[nd:], lens[nd:], self.xp)
        tail_tokens = tokens[nd:]                     # decode rows come first: token i is row i
        if feed is not None and (feed.rows >= nd).any():
            tail_feed = feed.select(feed.rows >= nd)
            tail_tokens = self.xp.asarray(tail_tokens)
            tail_tokens[self.xp.asarray(tail_feed.rows - nd)] = \
                tail_feed.ids[self.xp.asarray(tail_feed.src)].astype(tail_tokens.dtype)
        tail = self.model.forward(tail_tokens, positions[nd:], batch, self.pool)
        return (tail if nd == 0 else self.xp.concatenate([head[0], tail])), None

    def _sample(self, cur: _StepInFlight, logits, rows: list[int], packed: np.ndarray, ids=None) -> None:
        """Draw every sampling row's token on the device (``ids``: already drawn by the graph)
        and, for requests that ask, its log-probabilities; start their copy to the host without
        waiting. With async scheduling they are taken in after the next step is queued."""
        if not rows:
            cur.host_ids = np.empty(0, dtype=np.int32)
            return
        if len(rows) < logits.shape[0]:
            at = self.xp.asarray(rows)
            logits, packed = logits[at], packed[:, rows]                    # [len(rows), V], [F, len(rows)]
            ids = None if ids is None else ids[at]
        slot = self._pinned_slot = self._pinned_slot ^ 1      # two pinned sets: this step's and the one in flight
        params = packed if self.stream is None else self._pinned[slot].upload_params(packed, self.stream)
        if ids is None:
            ids = kernels.sample(logits, params, stream=self.stream)        # [len(rows)] int32
        num_top = max((self._states[r].params.logprobs for r in cur.sampled
                       if self._states[r].params.logprobs is not None), default=None)
        lp = None if num_top is None else kernels.sample_logprobs(logits, params, ids, num_top, stream=self.stream)
        cur.tokens, cur.collect_later = ids, self.async_scheduling
        if self.stream is None:
            cur.host_ids, cur.logprobs = ids, lp
            return
        cur.host_ids, cur.logprobs, cur.event = self._pinned[slot].download(ids, lp, self.stream)

    def _collect(self, cur: _StepInFlight) -> int:
        """The step's sampled ids are on the host (waits for its copy alone, not the device):
        append them, retire requests that stop, record the step. Returns how many finished."""
        t0 = time.perf_counter()
        if cur.event is not None:
            cur.event.synchronize()
        ids = cur.host_ids.tolist()
        now = time.perf_counter()
        cur.wait_s = now - t0
        keep, dropped, finished = {}, [], 0
        for j, (req, tok) in enumerate(zip(cur.sampled, ids)):
            state = self._states.get(req)
            if state is None or state.finish_reason:   # stopped or aborted while this row ran: drop it
                dropped.append(req)
                continue
            keep[req] = tok
            if state.logprobs is not None:
                state.logprobs.append(_token_logprobs(cur.logprobs, j, tok, state.params.logprobs))
        self.scheduler.drop_pending(dropped)
        self.scheduler.resolve(keep)
        for req, tok in keep.items():
            state = self._states[req]
            if state.first_token_t is None:
                state.first_token_t = now
            num_out = len(req.token_ids) - req.num_prompt_tokens     # ids known so far, this one included
            reason = stop_reason(state.params, tok, num_out, self.model.eos_token_ids)
            if reason is not None:
                state.done_t, state.finish_reason = now, reason
                if req.status is not Status.FINISHED:
                    self.scheduler.finish(req)
                finished += 1
        # The step's share of wall time: since the previous step's ids came in (or since this step
        # began, after an idle gap), so that steps in flight together are not counted twice.
        seconds = now - max(self._last_collect_t, cur.t0)
        self._last_collect_t = now
        self._measure_prefill(cur.step, seconds)
        self._record(now, seconds, cur)
        return finished

    def _measure_prefill(self, step, seconds: float) -> None:
        """Feed the auto-preemption cost model with prefill tokens/s measured on prefill-heavy steps."""
        if step.num_tokens >= 4 * len(step.requests) and seconds > 0:
            self.scheduler.preemptor.set_prefill_rate(step.num_tokens / seconds)

    def counters(self) -> dict[str, int]:
        """Cumulative counters, so a run's summary can report its own share."""
        sw, pc = self.swap, self.prefix_cache.stats() if self.prefix_cache else None
        return {"pages_out": sw.num_pages_out if sw else 0, "pages_in": sw.num_pages_in if sw else 0,
                "preempt_swap": self.scheduler.num_preemptions["swap"],
                "preempt_recompute": self.scheduler.num_preemptions["recompute"],
                "demotions": self.scheduler.num_demotions,
                "evictions": self.pool.num_evictions,
                "prefix_query_tokens": pc.num_query_tokens if pc else 0,
                "prefix_hit_tokens": pc.num_hit_tokens if pc else 0}

    def _record(self, now: float, seconds: float, cur: _StepInFlight) -> None:
        s, sw, step = self.pool.stats([r.pages for r in self.scheduler.running]), self.swap, cur.step
        self.stats.steps.append(StepRecord(
            now - self.stats.start_t, seconds, len(step.requests), step.num_tokens, s.num_used, s.fragmentation,
            s.num_cached, len(self.scheduler.running), len(self.scheduler.waiting), len(self.scheduler.swapped),
            sw.num_pages_out if sw else 0, sw.num_pages_in if sw else 0, step.num_prefill_tokens,
            cur.schedule_s, cur.launch_s, cur.wait_s))

    def is_finished(self, req: Request) -> bool:
        """Whether ``req`` (from add_request) has stopped: by a stop rule, its length, or abort."""
        return bool(self._states[req].finish_reason)

    def logprobs_so_far(self, req: Request) -> list[TokenLogprobs]:
        """The log-probabilities of ``req``'s tokens taken in so far (empty unless its
        SamplingParams asked for them); the list grows as steps come in: copy it to keep it."""
        return self._states[req].logprobs or []

    def pop_output(self, req: Request) -> RequestOutput:
        """The finished request's output; the engine forgets it (call once, after is_finished)."""
        if not self.is_finished(req):
            raise ValueError(f"request {req.request_id!r} has not finished")
        return self._output(req)

    def _output(self, req: Request) -> RequestOutput:
        state = self._states.pop(req)
        out_ids = req.token_ids[req.num_prompt_tokens:]
        first = state.first_token_t
        ttft = first - self.stats.start_t if first is not None else float("nan")
        tpot = (state.done_t - first) / (len(out_ids) - 1) if len(out_ids) > 1 else 0.0
        return RequestOutput(req.request_id, state.prompt, req.token_ids[:req.num_prompt_tokens], out_ids,
                             self.model.tokenizer.decode(out_ids), state.finish_reason, ttft, tpot,
                             req.num_preemptions, req.num_cached_tokens, state.logprobs)


@dataclass(slots=True, eq=False)
class _StepInFlight:
    """A queued step whose sampled ids may still be on the device; ``_collect`` takes them in."""

    step: object                   # the ScheduledStep
    sampled: list[Request]         # requests that sampled, in the order of ``tokens``
    t0: float
    tokens: object = None          # [len(sampled)] int32 ids on the device (NumPy on the CPU)
    host_ids: np.ndarray | None = None  # where they land on the host
    logprobs: tuple | None = None  # (chosen [n], top ids [n, N], top logprobs [n, N]) on the host
    event: object = None           # recorded after the copies to the host
    collect_later: bool = False    # collected after the next step is queued
    schedule_s: float = 0.0        # host seconds (StepRecord's fields of the same names)
    launch_s: float = 0.0
    wait_s: float = 0.0


class _Pinned:
    """Page-locked host buffers of one step in flight: the sampling settings going up and the
    drawn ids (and log-probabilities) coming down, so neither copy blocks the host. Each is a
    flat buffer viewed as a contiguous [rows, ...] array of the step's size."""

    def __init__(self, max_rows: int) -> None:
        import cupy as cp
        self.cp, self.max_rows = cp, max_rows
        self.params = _pinned_flat(cp, kernels.NUM_FIELDS * max_rows, np.int32)
        self.ids = _pinned_flat(cp, max_rows, np.int32)
        self.lp = None                 # allocated on the first step that asks for logprobs

    def upload_params(self, packed: np.ndarray, stream):
        """packed [NUM_FIELDS, n] int32 -> a device copy, enqueued on ``stream``."""
        host = self.params[:packed.size].reshape(packed.shape)
        host[:] = packed
        dev = self.cp.empty(packed.shape, dtype=np.int32)
        dev.set(host, stream=stream)
        return dev

    def download(self, ids, lp, stream):
        """(ids host view, logprobs host views or None, event recorded after the copies)."""
        n = ids.shape[0]
        host = self.ids[:n]
        ids.get(stream=stream, out=host, blocking=False)
        lp_host = None
        if lp is not None:
            if self.lp is None:
                m, k = self.max_rows, kernels.MAX_LOGPROBS
                self.lp = (_pinned_flat(self.cp, m, np.float32), _pinned_flat(self.cp, m * k, np.int32),
                           _pinned_flat(self.cp, m * k, np.float32))
            k = lp[1].shape[1]
            lp_host = (self.lp[0][:n], self.lp[1][:n * k].reshape(n, k), self.lp[2][:n * k].reshape(n, k))
            for src, dst in zip(lp, lp_host):
                self.cp.ascontiguousarray(src).get(stream=stream, out=dst, blocking=False)
        event = self.cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return host, lp_host, event


def _pinned_flat(cp, count: int, dtype) -> np.ndarray:
    mem = cp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype=dtype, count=count)


def _token_logprobs(lp, j: int, token: int, num_top: int) -> TokenLogprobs:
    chosen, top_ids, top_lp = lp
    top = tuple((int(i), float(v)) for i, v in zip(top_ids[j, :num_top].tolist(), top_lp[j, :num_top].tolist()))
    return TokenLogprobs(int(token), float(chosen[j]), top)


def _feed_rows(reqs: list[Request], prev: _StepInFlight | None) -> TokenFeed | None:
    """The rows whose token is still in flight (decode rows, packed first, so row i is token i),
    reading it from ``prev.tokens``; None when there are none."""
    if prev is None or not prev.collect_later:
        return None
    at = {req: j for j, req in enumerate(prev.sampled)}
    pairs = [(i, at[r]) for i, r in enumerate(reqs) if r.num_pending]
    if not pairs:
        return None
    a = np.asarray(pairs, dtype=np.int64)
    return TokenFeed(a[:, 0].copy(), a[:, 1].copy(), prev.tokens)


def _inputs(reqs: list[Request], lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """This step's token ids and positions, [T] int32 each, sequence by sequence. A token still
    in flight (decode rows only) is left 0 here and fed on the device."""
    if len(lens) == sum(lens):                                  # decode only: one token each
        positions = np.fromiter((r.num_computed for r in reqs), dtype=np.int32, count=len(reqs))
        tokens = np.fromiter((r.token_ids[r.num_computed] if not r.num_pending else 0 for r in reqs),
                             dtype=np.int32, count=len(reqs))
        return tokens, positions
    tokens = np.fromiter((t for r, n in zip(reqs, lens)
                          for t in (r.token_ids[r.num_computed:r.num_computed + n] if not r.num_pending else (0,))),
                         dtype=np.int32, count=sum(lens))
    positions = np.concatenate([np.arange(r.num_computed, r.num_computed + n, dtype=np.int32)
                                for r, n in zip(reqs, lens)])
    return tokens, positions


def default_pool_config(model: Model, num_pages: int | None, page_size: int, utilization: float) -> PoolConfig:
    """The pool LLM builds for ``model``: ``num_pages`` pages when given; else on CUDA
    ``utilization`` of the free device memory (after the weights), on the CPU 1 GiB. A CPU pool
    larger than the machine's memory is refused (ValueError naming num_pages)."""
    if num_pages is not None:
        config = model.pool_config(num_pages, page_size)
        limit = host_memory_bytes()
        if model.device == "cpu" and limit is not None and num_pages * config.page_bytes > limit:
            raise ValueError(f"num_pages {num_pages}: a pool of {num_pages * config.page_bytes / 2**30:.1f} GiB "
                             f"({config.page_bytes} bytes a page) is more than this machine's "
                             f"{limit / 2**30:.1f} GiB of memory")
        return config
    c = model.config
    kw = dict(page_size=page_size, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
              head_dim=c.head_dim, dtype=model.dtype.name, device=model.device)
    if model.device == "cuda":
        return PoolConfig.from_memory(gpu_memory_utilization=utilization, **kw)
    return PoolConfig.from_memory(memory_bytes=CPU_POOL_BYTES, **kw)


def host_memory_bytes() -> int | None:
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_swap_space(value, name: str = "swap_space") -> float:
    """GiB of host memory for swapped pages: a finite real >= 0, at most the machine's memory."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number of GiB, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of GiB >= 0, got {value}")
    limit = host_memory_bytes()
    if limit is not None and value * 2**30 > limit:
        raise ValueError(f"{name} {value:g} GiB is more than this machine's {limit / 2**30:.1f} GiB of memory")
    return value


def _check_engine_args(model, dtype, device, page_size, num_pages, utilization, swap_space, max_num_seqs,
                       max_num_batched_tokens, preemption, eviction, seed, watermark, admit_batch, flags):
    """LLM's arguments checked before anything is loaded: TypeError/ValueError naming the
    argument. Returns (page_size, num_pages, swap_space, max_num_seqs, max_num_batched_tokens,
    admit_batch, seed, watermark) as plain Python values."""
    if isinstance(model, (bytes, bytearray)) or not isinstance(model, (str, os.PathLike, Model)):
        raise TypeError(f"model must be a path, 'random:<preset>' or a Model, got {type(model).__name__} {model!r}")
    page_size = check_int(page_size, "page_size", 1)
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 1, got {page_size}")
    num_pages = None if num_pages is None else check_int(num_pages, "num_pages", 2)
    check_fraction(utilization, "gpu_memory_utilization")
    swap_space = check_swap_space(swap_space)
    counts = [check_int(v, n, 1) for n, v in (("max_num_seqs", max_num_seqs), ("admit_batch", admit_batch),
                                               ("max_num_batched_tokens", max_num_batched_tokens))]
    seed = check_int(seed, "seed", 0, SEED_LIMIT - 1)
    if isinstance(watermark, (bool, np.bool_)) or not isinstance(watermark, (int, float, np.integer, np.floating)):
        raise TypeError(f"watermark must be a number, got {type(watermark).__name__} {watermark!r}")
    if not 0.0 <= watermark < 1.0:
        raise ValueError(f"watermark must be in [0, 1), got {watermark}")
    check_mode(preemption, "preemption")
    if preemption != "recompute" and swap_space == 0:
        raise ValueError(f"preemption={preemption!r} needs swap_space > 0")
    if isinstance(eviction, str) or eviction is None:
        make_policy(eviction)
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    want = to_dtype(dtype) if dtype is not None else None
    where = resolve_device(device)
    if isinstance(model, Model) and (want not in (None, model.dtype) or (device != "auto" and where != model.device)):
        raise ValueError(f"dtype={dtype!r} / device={device!r} differ from the given Model's "
                         f"({model.dtype.name} on {model.device}); leave them out or load the model again")
    return page_size, num_pages, swap_space, counts[0], counts[2], counts[1], seed, float(watermark)


def _token_id_list(prompt) -> list[int]:
    """A prompt given as token ids: a sequence of ints (no bools, floats or strings)."""
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (list, tuple, np.ndarray, range)):
        raise TypeError(f"a prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
    ids = []
    for t in prompt:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"prompt token ids must be ints, got {t!r}")
        ids.append(int(t))
    return ids


def _prompt_list(prompts) -> list:
    """generate()'s prompts as a list: one str, or a non-empty sequence of str or of id lists."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, (list, tuple, np.ndarray)):
        raise TypeError(f"prompts must be a str or a list of str / token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    return list(prompts)


def _params_list(params) -> list | None:
    if params is None:
        return None
    if isinstance(params, SamplingParams):
        return [params]
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be SamplingParams or a list of them, got {type(params).__name__}")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params must hold SamplingParams, got {type(p).__name__}")
    return list(params)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)
