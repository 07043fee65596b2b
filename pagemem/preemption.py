"""Preemption primitives: take a running sequence's pages away, and give them back.

Two ways, as in vLLM v0:

    swap        exclusively owned pages go to host memory (one SwapTicket); pages another sequence
                shares stay resident with this sequence's reference (swapping them frees nothing).
                The page table is kept, with the swapped positions refilled on resume.
    recompute   every page is freed (tail first; prefix-cached pages stay evictable); only the
                token count is kept. Nothing is resumed: the caller prefills the tokens again
                (a Scheduler re-admits the request, reusing prefix-cache hits).

``Preemptor.choose`` (mode "auto") compares the two with measured figures: the achieved swap
bandwidth of completed tickets (``HostSwap.bandwidth``) and the prefill tokens/s the caller
measures (``prefill_tokens_per_s``). A scheduler calls ``preempt`` and, after a swap, ``resume``;
nothing here decides *which* sequence to preempt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagemem.page_table import SeqPages
from pagemem.pool import NULL_PAGE
from pagemem.swap import HostSwap, OutOfHostPages, SwapTicket

MODES = ("swap", "recompute", "auto")


def check_mode(mode, name: str = "mode") -> str:
    """``mode`` if it is one of MODES, else ValueError naming the argument."""
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


@dataclass(eq=False, slots=True)
class Preempted:
    """A preempted sequence. Owns the ticket (swap) and the references to resident pages."""

    mode: str                      # "swap" | "recompute"
    num_tokens: int
    page_table: list[int] = field(default_factory=list)  # swap: resident pages, NULL_PAGE where swapped
    swapped_at: list[int] = field(default_factory=list)  # swap: positions in page_table of ticket pages
    ticket: SwapTicket | None = None
    spent: bool = False            # resumed or discarded: the record holds nothing any more

    @property
    def resident(self) -> list[int]:
        """The pages this record keeps on the device (shared ones, under swap), in table order."""
        return [pid for pid in self.page_table if pid != NULL_PAGE]


class Preemptor:
    """Preempt and resume sequences of one pool, by swap (through ``swap``) or recompute.

    ``prefill_tokens_per_s``: the caller's measured prefill throughput, needed by mode "auto";
    update it with ``set_prefill_rate`` as measurements come in.
    """

    def __init__(self, swap: HostSwap | None, prefill_tokens_per_s: float | None = None, pool=None) -> None:
        if swap is None and pool is None:
            raise ValueError("give swap (a HostSwap) or, for recompute only, pool")
        if swap is not None and pool is not None and swap.pool is not pool:
            raise ValueError("pool: swap belongs to another pool")
        self.swap = swap
        self.pool = swap.pool if swap is not None else pool
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
        check_mode(mode)
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

    def resume(self, p: Preempted, stream=None, *, defer: bool = False) -> SeqPages:
        """Give a swap-preempted sequence its pages back: the ticket is swapped in on ``stream``
        (the compute stream waits on it); with ``defer``, by ``swap.flush``, together with the
        step's other deferred swap-ins. The returned seq owns one reference per page; ``p`` is spent.
        Raises OutOfPages, ValueError (a recompute or spent record); nothing changed then."""
        if not isinstance(p, Preempted) or p.spent or p.mode != "swap":
            raise ValueError("p must be a swap Preempted record not yet resumed")
        table = list(p.page_table)
        if p.ticket is not None:
            for i, page_id in zip(p.swapped_at, self.swap.swap_in(p.ticket, stream, defer=defer)):
                table[i] = page_id
        p.spent = True
        return SeqPages(self.pool, table, p.num_tokens)

    def discard(self, p: Preempted) -> None:
        """Drop a preempted sequence for good (aborted): its ticket and resident references go."""
        if p.spent:
            raise ValueError("p is spent (resumed or discarded)")
        if p.ticket is not None:
            self.swap.discard(p.ticket)
        resident = p.resident
        if resident:
            self.pool.free(resident[::-1])
        p.spent = True

    def _exclusive_positions(self, seq: SeqPages) -> list[int]:
        return [i for i, pid in enumerate(seq.page_table) if self.pool.refcount(pid) == 1]


__all__ = ["MODES", "OutOfHostPages", "Preempted", "Preemptor", "check_mode"]
