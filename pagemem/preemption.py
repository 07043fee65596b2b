"""Preemption primitives: take a running sequence's pages away, and give them back.

Two ways, as in vLLM v0:

    swap        exclusively owned pages go to host memory (one SwapTicket); pages another sequence
                shares stay resident with this sequence's reference (swapping them frees nothing).
                The page table is kept, with the swapped positions refilled on resume.
    recompute   every page is freed (tail first; prefix-cached pages stay evictable); only the
                token count is kept. Resume allocates pages again (reusing prefix-cache hits) and
                the caller recomputes the K/V of the tokens after the hit.

``Preemptor.choose`` (mode "auto") compares the two with measured figures: the achieved swap
bandwidth of completed tickets (``HostSwap.bandwidth``) and the prefill tokens/s the caller
measures (``prefill_tokens_per_s``). A scheduler calls ``preempt`` and ``resume``; nothing here
decides *which* sequence to preempt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from pagemem.page_table import SeqPages
from pagemem.pool import NULL_PAGE, OutOfPages
from pagemem.prefix_cache import PrefixCache
from pagemem.swap import HostSwap, OutOfHostPages, SwapTicket

MODES = ("auto", "swap", "recompute")


@dataclass(eq=False, slots=True)
class Preempted:
    """A preempted sequence. Owns the ticket (swap) and the references to resident pages."""

    mode: str                      # "swap" | "recompute"
    num_tokens: int
    page_table: list[int] = field(default_factory=list)  # swap: resident pages, NULL_PAGE where swapped
    swapped_at: list[int] = field(default_factory=list)  # swap: positions in page_table of ticket pages
    ticket: SwapTicket | None = None
    resumed: bool = False

    @property
    def resident(self) -> list[int]:
        """The pages this record keeps on the device (shared ones, under swap), in table order."""
        return [pid for pid in self.page_table if pid != NULL_PAGE]


class Preemptor:
    """Preempt and resume sequences of one pool, by swap (through ``swap``) or recompute.

    ``prefill_tokens_per_s``: the caller's measured prefill throughput, needed by mode "auto";
    update it with ``set_prefill_rate`` as measurements come in.
    """

    def __init__(self, swap: HostSwap | None, prefix_cache: PrefixCache | None = None,
                 prefill_tokens_per_s: float | None = None, pool=None) -> None:
        if swap is None and pool is None:
            raise ValueError("give swap (a HostSwap) or, for recompute only, pool")
        if swap is not None and pool is not None and swap.pool is not pool:
            raise ValueError("pool: swap belongs to another pool")
        self.swap = swap
        self.pool = swap.pool if swap is not None else pool
        self.prefix_cache = prefix_cache
        self.prefill_tokens_per_s: float | None = None
        if prefill_tokens_per_s is not None:
            self.set_prefill_rate(prefill_tokens_per_s)

    def set_prefill_rate(self, tokens_per_s: float) -> None:
        """Record a measured prefill throughput (tokens/s) for the cost model."""
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        self.prefill_tokens_per_s = float(tokens_per_s)

    # ---- cost model ------------------------------------------------------------------------
    def swap_cost_s(self, num_pages: int) -> float | None:
        """Seconds to swap ``num_pages`` out and back in at the measured bandwidths, or None
        before a ticket has completed in each direction."""
        bw_out, bw_in = self.swap.bandwidth("out"), self.swap.bandwidth("in")
        if bw_out is None or bw_in is None:
            return None
        nbytes = num_pages * self.swap.page_bytes
        return nbytes / bw_out + nbytes / bw_in

    def recompute_cost_s(self, num_tokens: int) -> float:
        """Seconds to prefill ``num_tokens`` again at the measured prefill rate."""
        if self.prefill_tokens_per_s is None:
            raise ValueError("mode 'auto' needs prefill_tokens_per_s: call set_prefill_rate() first")
        return num_tokens / self.prefill_tokens_per_s

    def choose(self, seq: SeqPages) -> str:
        """'swap' or 'recompute' for ``seq``, changing nothing.

        recompute when there is no HostSwap or too few free host pages; otherwise the cheaper of
        swap_cost_s(exclusive pages) and recompute_cost_s(num_tokens). Before any ticket has
        completed, swap (it yields the first bandwidth figure).
        """
        exclusive = self._exclusive_positions(seq)
        if self.swap is None or not exclusive:
            return "recompute" if self.swap is None else "swap"
        if not self.swap.can_swap_out(len(exclusive)):
            return "recompute"
        recompute = self.recompute_cost_s(seq.num_tokens)
        swap = self.swap_cost_s(len(exclusive))
        return "swap" if swap is None or swap < recompute else "recompute"

    # ---- preempt / resume ------------------------------------------------------------------
    def preempt(self, seq: SeqPages, mode: str = "auto", stream=None, priority: int = 0, *,
                defer: bool = False) -> Preempted:
        """Take ``seq``'s pages away; ``seq`` is left empty and the returned record owns what it
        held (ticket, resident shared pages). ``defer`` (swap): the swapped pages are free at once
        and ``swap.flush`` queues their copy, with the step's other deferred swaps (HostSwap).
        Raises ValueError (bad mode or seq), OutOfHostPages (mode "swap", host full); either way
        nothing changed."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(seq, SeqPages) or seq.pool is not self.pool:
            raise ValueError("seq must be a SeqPages of this Preemptor's pool")
        if mode == "auto":
            mode = self.choose(seq)
        if mode == "recompute":
            num_tokens = seq.num_tokens
            seq.free(priority)
            return Preempted("recompute", num_tokens)
        if self.swap is None:
            raise ValueError("mode 'swap' needs a HostSwap")
        at = self._exclusive_positions(seq)
        ticket = None
        if at:
            ticket = self.swap.swap_out([seq.page_table[i] for i in at], stream, priority, defer=defer)
        table = list(seq.page_table)
        for i in at:
            table[i] = NULL_PAGE
        out = Preempted("swap", seq.num_tokens, table, at, ticket)
        seq.page_table, seq.num_tokens = [], 0
        return out

    def can_resume(self, p: Preempted) -> bool:
        """Whether ``resume`` would find enough free device pages now (no prefix-cache credit)."""
        need = len(p.swapped_at) if p.mode == "swap" else -(-p.num_tokens // self.pool.page_size)
        return self.pool.can_allocate(need) if need else True

    def resume(self, p: Preempted, token_ids: Sequence[int] | None = None, stream=None, *,
               defer: bool = False) -> tuple[SeqPages, int]:
        """Give a preempted sequence its pages back: ``(seq, num_computed)`` where the K/V of
        tokens ``[num_computed, num_tokens)`` must be recomputed by the caller (none after a swap).

        swap: the ticket is swapped in on ``stream`` (the compute stream waits on it); with
        ``defer``, by ``swap.flush``, together with the step's other deferred swap-ins.
        recompute: prefix-cache hits for ``token_ids`` (if a PrefixCache was given) are reused,
        the rest allocated. The returned seq owns one reference per page; ``p`` is spent.
        Raises OutOfPages (check can_resume), ValueError (spent record); nothing changed then.
        """
        if not isinstance(p, Preempted) or p.resumed:
            raise ValueError("p must be a Preempted record not yet resumed")
        if p.mode == "swap":
            table = list(p.page_table)
            if p.ticket is not None:
                for i, page_id in zip(p.swapped_at, self.swap.swap_in(p.ticket, stream, defer=defer)):
                    table[i] = page_id
            p.resumed = True
            return SeqPages(self.pool, table, p.num_tokens), p.num_tokens
        if token_ids is not None and len(token_ids) < p.num_tokens:
            raise ValueError(f"token_ids: {len(token_ids)} tokens, the sequence had {p.num_tokens}")
        hits: list[int] = []
        if self.prefix_cache is not None and token_ids is not None:
            hits = self.prefix_cache.match(token_ids[:p.num_tokens])
        seq = SeqPages(self.pool, hits, len(hits) * self.pool.page_size)
        try:
            seq.append(p.num_tokens - seq.num_tokens)
        except OutOfPages:
            seq.free()  # give the hits back: nothing changed but LRU order of revived pages
            raise
        p.resumed = True
        return seq, len(hits) * self.pool.page_size

    def discard(self, p: Preempted) -> None:
        """Drop a preempted sequence for good (aborted): its ticket and resident references go."""
        if p.resumed:
            raise ValueError("p was already resumed")
        if p.ticket is not None:
            self.swap.discard(p.ticket)
        resident = p.resident
        if resident:
            self.pool.free(resident[::-1])
        p.resumed = True

    def _exclusive_positions(self, seq: SeqPages) -> list[int]:
        return [i for i, pid in enumerate(seq.page_table) if self.pool.refcount(pid) == 1]


__all__ = ["MODES", "OutOfHostPages", "Preempted", "Preemptor"]
