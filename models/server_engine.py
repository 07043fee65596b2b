"""EngineLoop: the one thread that steps the LLM for every connection of ``pagemem serve``.

Only this thread touches the LLM. The event loop hands it work through a queue (``submit``,
``cancel``, ``call``) and gets answers back through ``loop.call_soon_threadsafe``: each Job's
``accepted`` future, then the Deltas of its choices on the Job's asyncio queue. A call that
arrives while others run is queued at once, and the scheduler lets it join the running batch at
the next step (continuous batching). After every step the thread decodes each choice's new
tokens (TextStream), ends a choice whose text reached a stop string by aborting its request,
and publishes a Snapshot for /metrics.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from pagemem.models.engine import LLM, TokenLogprobs
from pagemem.models.sampling import SamplingParams
from pagemem.models.server_metrics import Metrics, take_snapshot
from pagemem.models.server_text import TextStream
from pagemem.scheduler import Request

log = logging.getLogger("pagemem.serve")
MAX_FAILED_STEPS = 3     # consecutive failed steps after which the engine thread stops


class QueueFull(Exception):
    """The waiting queue holds ``max_waiting`` requests: the call is refused (HTTP 503)."""


class EngineFailure(RuntimeError):
    """A step raised: every request in the engine at that moment is retired with this."""


@dataclass(frozen=True, slots=True)
class ChoiceSpec:
    """One engine request of a call: prompt ids, sampling settings and stop strings."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """What one step added to one choice: the text now safe to send and the new token ids.
    The last Delta of a choice has ``finish_reason`` and, if asked for, every token's logprobs."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None


class Job:
    """One HTTP call, made on the event loop's thread: ``specs`` become one engine request each.

    The engine thread answers through ``accepted`` (result None, or the exception that refused
    the call: QueueFull, ValueError, TypeError) and then ``events`` (Deltas, or an EngineFailure),
    both only by ``loop.call_soon_threadsafe``.
    """

    def __init__(self, specs: list[ChoiceSpec], arrival: float | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.specs = specs
        self.arrival = time.perf_counter() if arrival is None else arrival   # when the HTTP call came
        self.accepted: asyncio.Future = self.loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()


@dataclass(slots=True, eq=False)
class _Choice:
    """A live engine request of a Job, owned by the engine thread."""

    job: Job
    index: int
    req: Request
    text: TextStream
    num_seen: int = 0                 # output ids already taken from req.token_ids
    num_sent: int = 0                 # characters of text already handed out
    first_t: float | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class EngineLoop:
    """Owns ``llm`` once started: steps it in a daemon thread while any request is unfinished.
    ``max_waiting`` bounds the scheduler's waiting queue (a call that would pass it gets QueueFull)."""

    def __init__(self, llm: LLM, *, max_waiting: int = 1024) -> None:
        self.llm = llm
        self.max_waiting = max_waiting
        self.metrics = Metrics(take_snapshot(llm))
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._num_failures = 0            # consecutive failed steps
        self.failure: str | None = None   # why the thread gave up, if it did
        self._choices: dict[Request, _Choice] = {}
        self._eos = frozenset(llm.model.eos_token_ids)
        self._thread = threading.Thread(target=self._run, name="pagemem-engine", daemon=True)

    # ---- the event loop's side --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_live(self) -> int:
        """Engine requests of calls in progress (read it on the engine thread, e.g. through call)."""
        return len(self._choices)

    def submit(self, job: Job) -> None:
        """Queue ``job``; its ``accepted`` future says whether the engine took it."""
        if not self.alive:
            job.accepted.set_exception(EngineFailure(f"the engine has stopped: {self.failure or 'shut down'}"))
            return
        self._put(("add", job))

    def cancel(self, job: Job) -> None:
        """Abort every request of ``job`` that is still live (the client went away)."""
        self._put(("abort", job))

    def call(self, fn) -> asyncio.Future:
        """Run ``fn(llm)`` on the engine thread between steps; a future of its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._put(("call", (fn, loop, fut)))
        return fut

    def _put(self, item) -> None:
        self._inbox.append(item)
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain()
            try:
                if self.llm.has_unfinished():
                    self._step()
                    continue
                if self.llm.swap is not None:
                    self.llm.swap.reclaim(wait=True)   # finished swap-outs give their pages back
                self._publish()
            except Exception as e:  # noqa: BLE001 -- a broken step fails its requests, not the server
                self._failed(e)
                continue
            self._wake.wait()
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        """The thread is ending: calls still in the inbox are refused, not left waiting."""
        while self._inbox:
            kind, arg = self._inbox.popleft()
            if kind == "add":
                _settle(arg.loop, arg.accepted, None, EngineFailure(f"the engine has stopped: {self.failure or 'shut down'}"))

    def _drain(self) -> None:
        while self._inbox:
            kind, arg = self._inbox.popleft()
            try:
                if kind == "add":
                    self._add(arg)
                elif kind == "abort":
                    self._abort_job(arg)
                else:
                    fn, loop, fut = arg
                    _settle(loop, fut, *_attempt(fn, self.llm))
            except Exception:  # noqa: BLE001 -- the loop must outlive any one call's bug
                log.exception("engine loop: %s failed", kind)

    def _add(self, job: Job) -> None:
        """Queue every choice of ``job``, or none of them (the refusal goes to ``accepted``)."""
        decode = self.llm.model.tokenizer.decode
        try:
            self._check(job)
            texts = [TextStream(decode, spec.stop) for spec in job.specs]
            reqs = self._queue_all(job.specs)
        except Exception as e:  # noqa: BLE001 -- every refusal goes back to the call (QueueFull, ValueError, ...)
            _settle(job.loop, job.accepted, None, e)
            return
        for i, (spec, req, text) in enumerate(zip(job.specs, reqs, texts)):
            stops = spec.params.stop_token_ids + (() if spec.params.ignore_eos else tuple(self._eos))
            self._choices[req] = _Choice(job, i, req, text, stop_ids=frozenset(stops))
        _settle(job.loop, job.accepted, None, None)

    def _check(self, job: Job) -> None:
        n = len(job.specs)
        if n > self.max_waiting:
            raise ValueError(f"the call asks for {n} completions; the server queues at most {self.max_waiting}")
        if len(self.llm.scheduler.waiting) + n > self.max_waiting:
            raise QueueFull(f"{len(self.llm.scheduler.waiting)} requests are waiting (at most {self.max_waiting})")
        for i, spec in enumerate(job.specs):
            self.llm.scheduler.check(i, spec.prompt_ids, spec.params.max_tokens)

    def _queue_all(self, specs: list[ChoiceSpec]) -> list[Request]:
        reqs: list[Request] = []
        try:
            for spec in specs:
                reqs.append(self.llm.add_request(spec.prompt_ids, spec.params))
        except Exception:
            for req in reqs:          # a refused call leaves nothing queued
                self.llm.abort(req)
                self.llm.pop_output(req)
            raise
        return reqs

    def _abort_job(self, job: Job) -> None:
        for ch in [c for c in self._choices.values() if c.job is job]:
            self.llm.abort(ch.req)
            self._retire(ch, "abort")

    def _step(self) -> None:
        """One engine step, then each live choice's new tokens to its call."""
        self.llm.step()
        self._num_failures = 0
        out: list[tuple[Job, object]] = []
        for ch in list(self._choices.values()):
            delta = self._advance(ch)
            if delta is not None:
                out.append((ch.job, delta))
        self._post(out)
        self._publish()

    def _advance(self, ch: _Choice) -> Delta | None:
        """Take ``ch``'s new tokens; end it on the engine's word or on a stop string."""
        req = ch.req
        new = req.token_ids[req.num_prompt_tokens + ch.num_seen:]
        done = self.llm.is_finished(req)
        if not new and not done:
            return None
        if new and ch.first_t is None:
            ch.first_t = time.perf_counter()
        ch.num_seen += len(new)
        out = self.llm.pop_output(req) if done else None
        # A stop token or EOS ends the text before it (its own text is not part of the reply).
        ends_on_id = out is not None and out.finish_reason == "stop" and bool(new) and new[-1] in ch.stop_ids
        ch.text.add(new[:-1] if ends_on_id else new)
        if out is None and ch.text.stopped:         # a stop string: the request ends here
            self.llm.abort(req)
            out = self.llm.pop_output(req)
        if out is None:
            return self._delta(ch, new, None, None)
        reason = "stop" if ch.text.stopped else out.finish_reason
        ch.text.flush()
        self._retire(ch, reason, len(out.token_ids))
        return self._delta(ch, new, reason, None if out.logprobs is None else tuple(out.logprobs))

    def _delta(self, ch: _Choice, new: list[int], reason: str | None, logprobs) -> Delta | None:
        text = ch.text.text if reason is not None else ch.text.ready()
        piece, ch.num_sent = text[ch.num_sent:], len(text)
        return Delta(ch.index, piece, tuple(new), reason, logprobs)

    def _retire(self, ch: _Choice, reason: str, num_out: int | None = None) -> None:
        """Forget ``ch`` (its request already left the engine) and record how it went."""
        del self._choices[ch.req]
        now = time.perf_counter()
        num_out = ch.num_seen if num_out is None else num_out
        ttft = None if ch.first_t is None else ch.first_t - ch.job.arrival
        tpot = (now - ch.first_t) / (num_out - 1) if ch.first_t is not None and num_out > 1 else None
        self.metrics.observe(reason, ttft, tpot, ch.req.num_prompt_tokens, num_out)

    def _failed(self, e: Exception) -> None:
        """A step (or taking in its tokens) raised: every live request is retired, each call
        told. After MAX_FAILED_STEPS in a row the engine is deemed broken and the thread ends."""
        log.exception("engine step failed")
        self._num_failures += 1
        error = EngineFailure(f"the engine step failed: {type(e).__name__}: {e}")
        jobs = {}
        for ch in list(self._choices.values()):
            with contextlib.suppress(Exception):        # retire the rest even if one cannot be
                if not self.llm.is_finished(ch.req):
                    self.llm.abort(ch.req)
                self.llm.pop_output(ch.req)
            self._retire(ch, "error")
            jobs[id(ch.job)] = ch.job
        self._post([(job, error) for job in jobs.values()])
        if self._num_failures >= MAX_FAILED_STEPS:
            self.failure, self._stopping = f"{MAX_FAILED_STEPS} steps failed in a row, the last with {e!r}", True

    def _post(self, items: list[tuple[Job, object]]) -> None:
        """Hand events to their jobs' event loops: one callback per loop per step."""
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for job, item in items:
            by_loop.setdefault(id(job.loop), (job.loop, []))[1].append((job.events, item))
        for loop, batch in by_loop.values():
            _call_soon(loop, _deliver, batch)

    def _publish(self) -> None:
        self.metrics.snapshot = take_snapshot(self.llm)


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _attempt(fn, llm) -> tuple[object, BaseException | None]:
    try:
        return fn(llm), None
    except Exception as e:  # noqa: BLE001 -- handed to the caller's future
        return None, e


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result, error: BaseException | None) -> None:
    """Resolve ``fut`` on its loop's thread (a future already cancelled is left alone)."""
    def done() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    _call_soon(loop, done)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:          # the loop has closed: nobody is listening any more
        pass
