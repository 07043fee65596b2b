"""Decode steps replayed from CUDA graphs, so a step costs one launch instead of hundreds.

A decode step of a small model is launch-bound: the NumPy-style forward enqueues hundreds of
CuPy and Numba kernels per step, each costing microseconds of host time. Capturing the whole
forward once per shape and replaying it removes that cost.

Shapes are bucketed: ``num_seqs`` up to the next batch bucket, ``max_pages`` up to the next
power of two. Padded rows point at NULL_PAGE with context_len 1 (store_kv skips NULL_PAGE
slots on the GPU; their outputs are discarded). Inputs live in one static device buffer
refreshed by a single host-to-device copy per step, the rows' sampling settings included; each
graph writes its logits, and the token ids it draws from them (``pagemem.kernels.sample``, inside
the graph), into static buffers shared by all graphs. Padded rows sample greedily.

Memory: everything allocated while capturing comes from a private CuPy pool that only the
graphs use, so no other allocation can reuse a block a graph writes to. Graphs run one at a
time on the engine's stream, so sharing temporaries between graphs is safe.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from pagemem import kernels
from pagemem.models.cublas_graph import CapturableGemm
from pagemem import PagedBatch, PagePool, SeqPages, slot
from pagemem.page_table import fill_page_tables

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                 1024)


@functools.cache
def _feed_kernel():
    """token_ids[i] = ids[src[i]] where src[i] >= 0: a decode row's token sampled by the step
    before, still on the device."""
    import cupy as cp
    return cp.ElementwiseKernel("int32 src, raw T ids", "int32 tok", "if (src >= 0) tok = (int)ids[src];",
                                "pagemem_feed_tokens")


class TokenFeed(NamedTuple):
    """Decode rows whose input token is still on the device, drawn by the step before: row
    ``rows[k]`` (row i is token i) reads ``ids[src[k]]`` instead of its host token."""

    rows: np.ndarray               # [k] int64
    src: np.ndarray                # [k] int64 indices into ids
    ids: object                    # the previous step's drawn ids (a device array)

    def select(self, keep: np.ndarray) -> "TokenFeed":
        return TokenFeed(self.rows[keep], self.src[keep], self.ids)


@dataclass(eq=False)
class _Captured:
    """One captured bucket: its graph, the pinned host buffer and device buffer of every input it
    reads (one copy up a step), and the event recorded after the last copy out of ``host``."""

    graph: object
    host: np.ndarray
    dev: object
    uploaded: object = None


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


class DecodeGraphs:
    """Captured decode forwards keyed by (batch bucket, page bucket), replayed on ``stream``."""

    def __init__(self, model, pool: PagePool, stream, max_num_seqs: int = 256) -> None:
        import cupy as cp
        self.cp, self.model, self.pool, self.stream = cp, model, pool, stream
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_num_seqs) + (max_num_seqs,)
        self.max_seqs = max_num_seqs
        self.mempool = cp.cuda.MemoryPool()
        self.graphs: dict[tuple[int, int], _Captured] = {}     # (batch bucket, page bucket) -> capture
        with cp.cuda.using_allocator(self.mempool.malloc):
            self.logits = cp.empty((max_num_seqs, model.config.vocab_size), dtype=cp.float32)  # [B, V]
            self.ids = cp.zeros(max_num_seqs, dtype=cp.int32)                                   # [B] drawn
        self.gemm = CapturableGemm(stream)     # CuPy's own matmul cannot be captured
        self.num_captures = self.num_replays = 0
        self.capture_s = 0.0
        self.disabled: str | None = None       # why capture failed, if it did: eager from then on

    def can_run(self, seqs: Sequence[SeqPages], query_lens: Sequence[int]) -> bool:
        return (self.disabled is None and 0 < len(seqs) <= self.max_seqs
                and all(q == 1 for q in query_lens))

    def run(self, tokens: np.ndarray, positions: np.ndarray, seqs: Sequence[SeqPages], feed: TokenFeed | None = None,
            packed=None):
        """(logits [num_seqs, V] float32, drawn ids [num_seqs] int32): views into the static
        buffers, valid until the next run; or None if capturing failed (the caller runs the step
        eagerly). ``packed`` [NUM_FIELDS, num_seqs] int32: the rows' sampling settings
        (``pagemem.kernels.pack_sampling_params``; None: greedy).

        ``feed``: the rows whose token id is still on the device (they read it there instead
        of from ``tokens``)."""
        n = len(seqs)
        max_pages = max(len(s.page_table) for s in seqs)
        key = (_bucket(n, self.buckets), self._page_bucket(max_pages))
        if key not in self.graphs:
            if feed is not None:       # capturing draws into self.ids, which may hold the fed ids
                feed = feed._replace(ids=feed.ids.copy())
            if not self._try_capture(key):
                return None
        g = self.graphs[key]
        if g.uploaded is not None:
            g.uploaded.synchronize()   # the last copy out of this pinned buffer has left it
        self._fill(g.host, key, tokens, positions, seqs, packed)
        v = self._views(g.host, key)
        v["token_src"][:] = -1
        if feed is not None:
            v["token_src"][feed.rows] = feed.src
        g.dev.set(g.host, stream=self.stream)        # one host-to-device copy of every input
        if g.uploaded is None:
            g.uploaded = self.cp.cuda.Event(block=False, disable_timing=True)
        g.uploaded.record(self.stream)
        if feed is not None:
            d = self._views(g.dev, key)
            _feed_kernel()(d["token_src"], feed.ids, d["token_ids"])
        g.graph.launch(stream=self.stream)
        self.num_replays += 1
        return self.logits[:n], self.ids[:n]

    def capture_all(self, max_context_len: int) -> None:
        """Capture every (batch, page) bucket up to ``max_context_len`` tokens ahead of time, as
        vLLM does at start-up, so no step of a run pays for compiling or capturing."""
        top = self._page_bucket(-(-max_context_len // self.pool.page_size))
        for b in self.buckets:
            p = self._page_bucket(1)
            while p <= top and self.disabled is None:
                if (b, p) not in self.graphs:
                    self._try_capture((b, p))
                p *= 2

    @staticmethod
    def _page_bucket(max_pages: int) -> int:
        return 1 << max(3, (max_pages - 1).bit_length())

    def _try_capture(self, key: tuple[int, int]) -> bool:
        t0 = time.perf_counter()
        try:
            self._capture(key)
        except Exception as e:  # noqa: BLE001 -- any capture failure: fall back to eager, say why
            self.disabled = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA-graph decode disabled, running eager: {self.disabled}", RuntimeWarning)
            return False
        self.capture_s += time.perf_counter() - t0
        return True

    # ---- static inputs ------------------------------------------------------------------------
    def _layout(self, key: tuple[int, int]) -> list[tuple[str, int]]:
        b, p = key
        return [("page_tables", b * p), ("context_lens", b), ("query_start_loc", b + 1),
                ("slot_mapping", b), ("token_ids", b), ("positions", b), ("token_src", b),
                ("sample_params", kernels.NUM_FIELDS * b)]

    def _views(self, buf, key: tuple[int, int]) -> dict:
        out, o = {}, 0
        for name, size in self._layout(key):
            out[name] = buf[o:o + size]
            o += size
        out["page_tables"] = out["page_tables"].reshape(key)
        out["sample_params"] = out["sample_params"].reshape(kernels.NUM_FIELDS, key[0])
        return out

    def _fill(self, host: np.ndarray, key, tokens, positions, seqs: Sequence[SeqPages], packed=None) -> None:
        """Write this step's inputs into the pinned host buffer; padded rows read NULL_PAGE and
        sample greedily (all-zero settings)."""
        n, ps = len(seqs), self.pool.page_size
        v = self._views(host, key)
        fill_page_tables(v["page_tables"], seqs)                     # [b, P], NULL_PAGE padded
        ctx = np.fromiter((s.num_tokens for s in seqs), dtype=np.int32, count=n)
        v["context_lens"][:n], v["context_lens"][n:] = ctx, 1
        v["query_start_loc"][:] = np.arange(key[0] + 1, dtype=np.int32)
        last = ctx - 1
        v["slot_mapping"][:n] = slot(v["page_tables"][np.arange(n), last // ps], last % ps, ps)
        v["slot_mapping"][n:] = 0                                    # NULL_PAGE: skipped by store_kv
        v["token_ids"][:n], v["token_ids"][n:] = tokens, 0
        v["positions"][:n], v["positions"][n:] = positions, 0
        v["sample_params"][:] = 0
        if packed is not None:
            v["sample_params"][:, :n] = packed

    # ---- capture ---------------------------------------------------------------------------------
    def _capture(self, key: tuple[int, int]) -> None:
        cp = self.cp
        size = sum(s for _, s in self._layout(key))
        host = np.frombuffer(cp.cuda.alloc_pinned_memory(4 * size), dtype=np.int32, count=size)
        with cp.cuda.using_allocator(self.mempool.malloc):
            dev = cp.zeros(size, dtype=cp.int32)
        v = self._views(dev, key)
        batch = PagedBatch(v["page_tables"], v["context_lens"], v["slot_mapping"], v["query_start_loc"],
                           max_context_len=key[1] * self.pool.page_size, max_query_len=1,
                           num_decode_seqs=key[0])
        # Padded rows everywhere, so the warm-up writes only NULL_PAGE slots (skipped).
        host[:] = 0
        hv = self._views(host, key)
        hv["context_lens"][:] = 1
        hv["query_start_loc"][:] = np.arange(key[0] + 1, dtype=np.int32)
        dev.set(host, stream=self.stream)
        with cp.cuda.using_allocator(self.mempool.malloc), self.stream:
            self._forward(batch, v, key)             # warm-up: compiles kernels, fills the pool
            self.stream.begin_capture()
            try:
                self._forward(batch, v, key)
            finally:
                graph = self.stream.end_capture()
        self.graphs[key] = _Captured(graph, host, dev)   # dev holds every input the graph reads
        self.num_captures += 1

    def _forward(self, batch: PagedBatch, v: dict, key) -> None:
        self.model.forward(v["token_ids"], v["positions"], batch, self.pool, mm=self.gemm,
                           out=self.logits[:key[0]])                                         # [b, V]
        kernels.sample(self.logits[:key[0]], v["sample_params"], out=self.ids[:key[0]], stream=self.stream)
