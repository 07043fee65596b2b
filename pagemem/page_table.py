"""Page tables: one sequence's pages (SeqPages) and the packed per-step batch (PagedBatch).

A sequence owns one reference to each page in its page table. Token ``t`` of a
sequence lives at ``slot(page_table[t // page_size], t % page_size, page_size)``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pagemem.pool import NULL_PAGE, PagePool

Array = Any  # numpy.ndarray on the CPU, cupy.ndarray on CUDA


def slot(page_id, offset, page_size: int):
    """A token's place in the pool: ``page_id * page_size + offset``. Works on ints and int arrays.
    The one place slots are computed."""
    return page_id * page_size + offset


@dataclass(frozen=True, slots=True)
class PagedBatch:
    """Where every sequence's K/V lives for one step. Built by pack_batch(); read-only for kernels."""

    page_tables: Array      # [num_seqs, max_pages] int32, padded with NULL_PAGE
    context_lens: Array     # [num_seqs] int32, >= 1: cached tokens after this step's new ones
    slot_mapping: Array     # [num_new_tokens] int32: where store_kv writes new K/V
    query_start_loc: Array  # [num_seqs + 1] int32: new tokens of seq i are [qsl[i], qsl[i+1])
    max_context_len: int = 0
    max_query_len: int = 0
    num_decode_seqs: int = 0    # leading sequences with one new token (pack decode rows first)
    host_query_lens: np.ndarray | None = None    # [num_seqs] int32 on the host, for host-side planning
    host_context_lens: np.ndarray | None = None  # [num_seqs] int32 on the host

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class SeqPages:
    """One sequence's page table and token count over a PagePool.

    It owns one reference to each page in ``page_table``. ``append`` allocates what it
    needs all at once or raises OutOfPages having changed nothing; ``free`` returns
    every page (tail first) and leaves the object empty.
    """

    __slots__ = ("pool", "page_table", "num_tokens")

    def __init__(self, pool: PagePool, page_table: list[int] | None = None, num_tokens: int = 0) -> None:
        page_table = [] if page_table is None else list(page_table)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        capacity = len(page_table) * pool.page_size
        if not capacity - pool.page_size < num_tokens <= capacity and (num_tokens or page_table):
            raise ValueError(f"num_tokens={num_tokens} does not fit {len(page_table)} pages of {pool.page_size}")
        self.pool = pool
        self.page_table = page_table
        self.num_tokens = num_tokens

    def __repr__(self) -> str:
        return f"SeqPages(num_tokens={self.num_tokens}, page_table={self.page_table})"

    def _needs_cow(self, num_new_tokens: int) -> bool:
        """Appending would write into a partial last page that another sequence shares."""
        return (num_new_tokens > 0 and self.num_tokens % self.pool.page_size != 0
                and self.pool._refcount[self.page_table[-1]] > 1)

    def num_pages_needed(self, num_new_tokens: int) -> int:
        """Pages append(num_new_tokens) would allocate, a copy-on-write page included."""
        if type(num_new_tokens) is int and num_new_tokens == 1 and self.num_tokens % self.pool.page_size:
            # decode into a partial last page, the common case: a page only if it is shared
            return int(self.pool._refcount[self.page_table[-1]] > 1)
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, (int, np.integer)):
            raise TypeError(f"num_new_tokens must be an int, got {type(num_new_tokens).__name__}")
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        ps = self.pool.page_size
        grow = -(-(self.num_tokens + num_new_tokens) // ps) - len(self.page_table)
        return grow + int(self._needs_cow(num_new_tokens))

    def can_append(self, num_new_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_pages_needed(num_new_tokens))

    def append(self, num_new_tokens: int, stream=None) -> np.ndarray:
        """Make room for ``num_new_tokens`` tokens and return their slots ([n] int32).

        If the last page is partial and shared (after fork), it is first copied to a
        fresh page on ``stream`` (copy-on-write) so neither sequence sees the other's tokens.
        """
        start = self.num_tokens
        self.grow(num_new_tokens, stream)
        return self.slots(start, self.num_tokens)

    def grow(self, num_new_tokens: int, stream=None) -> None:
        """append() without computing the slots (a scheduler packs them later with pack_batch)."""
        need = self.num_pages_needed(num_new_tokens)
        cow = self._needs_cow(num_new_tokens)
        new_pages = self.pool.allocate(need) if need else []  # raises OutOfPages, nothing changed
        if cow:
            old, copy = self.page_table[-1], new_pages.pop(0)
            self.pool.copy_page(old, copy, stream)
            self.pool.free([old])
            self.page_table[-1] = copy
        self.page_table += new_pages
        self.num_tokens += num_new_tokens

    def try_grow(self, num_new_tokens: int, stream=None) -> bool:
        """grow() when the pool has the pages it needs, else False with nothing changed. Decoding
        into a private partial last page, the common case, allocates nothing and checks nothing
        else (a scheduler calls this for every running sequence every step)."""
        if (type(num_new_tokens) is int and num_new_tokens == 1 and self.num_tokens % self.pool.page_size
                and self.pool._refcount[self.page_table[-1]] == 1):
            self.num_tokens += 1
            return True
        if not self.pool.can_allocate(self.num_pages_needed(num_new_tokens)):
            return False
        self.grow(num_new_tokens, stream)
        return True

    def slots(self, start: int, stop: int) -> np.ndarray:
        """Slots of tokens [start, stop): [stop - start] int32."""
        t = np.arange(start, stop, dtype=np.int64)
        ps = self.pool.page_size
        pages = np.asarray(self.page_table, dtype=np.int64)[t // ps]
        return slot(pages, t % ps, ps).astype(np.int32)

    def fork(self) -> SeqPages:
        """A child sharing every page (refcount +1 each); later appends copy-on-write."""
        if self.page_table:
            self.pool.share(self.page_table)
        return SeqPages(self.pool, self.page_table, self.num_tokens)

    def free(self, priority: int = 0) -> None:
        """Return every page to the pool, tail first (so the tail is reused or evicted first:
        a cached prefix's head is the part most likely shared). Leaves the sequence empty."""
        if self.page_table:
            self.pool.free(self.page_table[::-1], priority)
        self.page_table = []
        self.num_tokens = 0


def fill_page_tables(out: np.ndarray, seqs: Sequence[SeqPages]) -> None:
    """Write seq i's page table into row i of ``out`` ([>= len(seqs), max_pages] int32) and
    NULL_PAGE everywhere else. The one place page tables are packed."""
    num_pages = np.fromiter((len(s.page_table) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(s.page_table for s in seqs), dtype=np.int32,
                       count=int(num_pages.sum()))
    out[:] = NULL_PAGE
    out[:len(seqs)][np.arange(out.shape[1]) < num_pages[:, None]] = flat


def pack_batch(seqs: Sequence[SeqPages], query_lens: Sequence[int], xp=np) -> PagedBatch:
    """Pack a step's sequences into one PagedBatch with a single host-to-device transfer.

    ``query_lens[i]`` is how many of seq i's last tokens are new this step (1 for decode;
    the chunk length for prefill). Each seq must already hold them (``append`` first).
    """
    num_seqs = len(seqs)
    if num_seqs == 0:
        raise ValueError("pack_batch: seqs is empty")
    if len(query_lens) != num_seqs:
        raise ValueError(f"pack_batch: {len(query_lens)} query_lens for {num_seqs} seqs")
    ps = seqs[0].pool.page_size
    ctx = np.fromiter((s.num_tokens for s in seqs), dtype=np.int32, count=num_seqs)
    q = np.asarray(query_lens, dtype=np.int32)
    if (q < 1).any() or (q > ctx).any():
        bad = int(np.flatnonzero((q < 1) | (q > ctx))[0])
        raise ValueError(f"pack_batch: query_lens[{bad}]={q[bad]} must be in [1, context_len={ctx[bad]}]")
    num_pages = -(-ctx // ps)
    max_pages = int(num_pages.max())
    num_tokens = int(q.sum())
    # One host buffer, one transfer: [page_tables | context_lens | query_start_loc | slot_mapping]
    n_pt = num_seqs * max_pages
    buf = np.zeros(n_pt + 2 * num_seqs + 1 + num_tokens, dtype=np.int32)
    pt = buf[:n_pt].reshape(num_seqs, max_pages)  # [num_seqs, max_pages], NULL_PAGE padded
    fill_page_tables(pt, seqs)
    buf[n_pt:n_pt + num_seqs] = ctx
    qsl = buf[n_pt + num_seqs:n_pt + 2 * num_seqs + 1]
    np.cumsum(q, out=qsl[1:])
    # token i of the batch belongs to seq_idx[i] at position t[i] within that sequence
    seq_idx = np.repeat(np.arange(num_seqs), q)
    t = np.arange(num_tokens) - qsl[:-1][seq_idx] + (ctx - q)[seq_idx]
    buf[n_pt + 2 * num_seqs + 1:] = slot(pt[seq_idx, t // ps], t % ps, ps)
    dev = xp.asarray(buf)
    o = n_pt
    return PagedBatch(
        page_tables=dev[:o].reshape(num_seqs, max_pages),
        context_lens=dev[o:o + num_seqs],
        query_start_loc=dev[o + num_seqs:o + 2 * num_seqs + 1],
        slot_mapping=dev[o + 2 * num_seqs + 1:],
        max_context_len=int(ctx.max()),
        max_query_len=int(q.max()),
        num_decode_seqs=int(np.argmax(q != 1)) if (q != 1).any() else num_seqs,
        host_query_lens=q,
        host_context_lens=ctx,
    )
