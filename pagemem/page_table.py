"""Page tables: one sequence's pages (SeqPages) and the packed per-step batch (PagedBatch).

A sequence owns one reference to each page in its page table. Token ``t`` of a
sequence lives at ``slot(page_table[t // page_size], t % page_size, page_size)``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pagemem.config import check_int
from pagemem.pool import NULL_PAGE, PagePool

Array = Any  # numpy.ndarray on the CPU, cupy.ndarray on CUDA


def slot(page_id, offset, page_size: int):
    """A token's place in the pool: ``page_id * page_size + offset``. Works on ints and int arrays
    (page_id >= 0, 0 <= offset < page_size; TypeError for floats or bools, ValueError out of range).
    The one place slots are computed."""
    page_size = check_int(page_size, "page_size", 1)
    _check_slot_part(page_id, "page_id", 0, None)
    _check_slot_part(offset, "offset", 0, page_size - 1)
    return page_id * page_size + offset


def _check_slot_part(x, name: str, lo: int, hi: int | None) -> None:
    """An int in [lo, hi], or an int array whose values all are (a device array: its dtype only,
    since reading its values would wait for the device)."""
    device = hasattr(x, "__cuda_array_interface__")
    if not isinstance(x, np.ndarray) and not device:
        check_int(x, name, lo, hi)
        return
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be ints, got an array of {x.dtype}")
    if not device and x.size and (int(x.min()) < lo or (hi is not None and int(x.max()) > hi)):
        raise ValueError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got values "
                         f"from {int(x.min())} to {int(x.max())}")


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
        """Take over pages the caller already holds one reference to each (distinct pages in use:
        never NULL_PAGE, never a free page), holding ``num_tokens`` tokens. Changes no refcount."""
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, got {type(pool).__name__}")
        page_table = [] if page_table is None else _owned_pages(pool, page_table)
        num_tokens = check_int(num_tokens, "num_tokens", 0)
        capacity = len(page_table) * pool.page_size
        if not capacity - pool.page_size < num_tokens <= capacity and (num_tokens or page_table):
            raise ValueError(f"num_tokens={num_tokens} does not fit {len(page_table)} pages of {pool.page_size}")
        self.pool = pool
        self.page_table = page_table
        self.num_tokens = num_tokens

    def __repr__(self) -> str:
        return f"SeqPages(num_tokens={self.num_tokens}, page_table={self.page_table})"

    def needs_copy_on_write(self, num_new_tokens: int) -> bool:
        """Appending would write into a partial last page that another sequence shares."""
        return (num_new_tokens > 0 and self.num_tokens % self.pool.page_size != 0
                and self.pool.refcounts[self.page_table[-1]] > 1)

    def num_pages_needed(self, num_new_tokens: int) -> int:
        """Pages append(num_new_tokens) would allocate, a copy-on-write page included."""
        if type(num_new_tokens) is int and num_new_tokens == 1 and self.num_tokens % self.pool.page_size:
            # decode into a partial last page, the common case: a page only if it is shared
            return int(self.pool.refcounts[self.page_table[-1]] > 1)
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, (int, np.integer)):
            raise TypeError(f"num_new_tokens must be an int, got {type(num_new_tokens).__name__}")
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        ps = self.pool.page_size
        grow = -(-(self.num_tokens + num_new_tokens) // ps) - len(self.page_table)
        return grow + int(self.needs_copy_on_write(num_new_tokens))

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
        cow = self.needs_copy_on_write(num_new_tokens)
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
                and self.pool.refcounts[self.page_table[-1]] == 1):
            self.num_tokens += 1
            return True
        if not self.pool.can_allocate(self.num_pages_needed(num_new_tokens)):
            return False
        self.grow(num_new_tokens, stream)
        return True

    def slots(self, start: int, stop: int) -> np.ndarray:
        """Slots of tokens [start, stop): [stop - start] int32, for 0 <= start <= stop <= num_tokens."""
        start = check_int(start, "start", 0, self.num_tokens)
        stop = check_int(stop, "stop", start, self.num_tokens)
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
        priority = check_int(priority, "priority")
        if self.page_table:
            self.pool.free(self.page_table[::-1], priority)
        self.page_table = []
        self.num_tokens = 0


def _owned_pages(pool: PagePool, page_table) -> list[int]:
    """``page_table`` as a new list of ints after checking each is a distinct page in use."""
    pool.check_page_ids(page_table, "page_table")
    pages = [int(p) for p in page_table]
    if len(set(pages)) != len(pages):
        raise ValueError(f"page_table: page ids repeat in {pages}")
    free = [p for p in pages if pool.refcounts[p] == 0]
    if free:
        raise ValueError(f"page_table: pages {free} are free; a SeqPages takes pages its caller holds")
    return pages


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
    All seqs share one pool. Reads the seqs, changes nothing.
    """
    num_seqs = _check_seqs(seqs)
    ps = seqs[0].pool.page_size
    ctx = np.fromiter((s.num_tokens for s in seqs), dtype=np.int32, count=num_seqs)
    q = _check_query_lens(query_lens, num_seqs)
    if (q < 1).any() or (q > ctx).any():
        bad = int(np.flatnonzero((q < 1) | (q > ctx))[0])
        raise ValueError(f"pack_batch: query_lens[{bad}]={q[bad]} must be in [1, context_len={ctx[bad]}]")
    q = q.astype(np.int32)
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


def _check_seqs(seqs) -> int:
    """len(seqs) after checking it is a non-empty sequence of SeqPages over one pool."""
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise TypeError(f"seqs must be a sequence of SeqPages, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError("pack_batch: seqs is empty")
    pool = getattr(seqs[0], "pool", None)
    for i, s in enumerate(seqs):
        if not isinstance(s, SeqPages):
            raise TypeError(f"seqs[{i}] must be a SeqPages, got {type(s).__name__}")
        if s.pool is not pool:
            raise ValueError(f"seqs[{i}] belongs to another pool than seqs[0]")
    return len(seqs)


def _check_query_lens(query_lens, num_seqs: int) -> np.ndarray:
    """query_lens as [num_seqs] int64 after checking the values are ints (not floats or bools)."""
    if isinstance(query_lens, np.ndarray):
        if query_lens.ndim != 1 or query_lens.dtype.kind not in "iu":
            raise TypeError(f"query_lens must be a 1-d int array, got {query_lens.ndim}-d {query_lens.dtype}")
    elif isinstance(query_lens, (str, bytes)) or not isinstance(query_lens, Sequence):
        raise TypeError(f"query_lens must be a sequence of ints, got {type(query_lens).__name__}")
    elif list(map(type, query_lens)).count(int) != len(query_lens):
        for i, q in enumerate(query_lens):
            check_int(q, f"query_lens[{i}]")
    if len(query_lens) != num_seqs:
        raise ValueError(f"pack_batch: {len(query_lens)} query_lens for {num_seqs} seqs")
    try:
        return np.asarray(query_lens, dtype=np.int64)
    except OverflowError:
        raise ValueError("pack_batch: query_lens hold ints beyond 64 bits") from None
