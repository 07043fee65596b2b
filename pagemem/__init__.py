"""pagemem: the KV cache managed like an operating system manages memory.

This package owns every page: which are free, which are used and by how many
sequences (refcounts), which hold cached prefixes, and which were swapped to host
memory. It never computes attention; it moves pages with CuPy (or NumPy) copies.

Glossary (one word per concept):
    page          ``page_size`` tokens of K and V for every layer; the unit of allocation.
    page_id       an int index into the pool. NULL_PAGE = 0 is never handed out.
    page_table    one sequence's list of page ids, in token order.
    page_tables   the packed [num_seqs, max_pages] int32 batch array, NULL_PAGE padded.
    slot          page_id * page_size + offset: a token's place in the pool (``slot()``).
    context_len   tokens whose K/V are in the cache, the one being decoded included.
    swap out/in   pages to pinned host memory and back.  evict: drop a cached page.
    preempt       take a running sequence's pages away, by swap or recompute.
"""
from pagemem.backend import resolve_device
from pagemem.config import PoolConfig
from pagemem.eviction import FIFO, LRU, EvictionPolicy, Priority
from pagemem.page_table import PagedBatch, SeqPages, pack_batch, slot
from pagemem.pool import NULL_PAGE, OutOfPages, PagePool, PoolStats
from pagemem.prefix_cache import PrefixCache, PrefixCacheStats
from pagemem.swap import HostSwap, OutOfHostPages, SwapTicket
from pagemem.preemption import Preempted, Preemptor

__all__ = [
    "NULL_PAGE", "PoolConfig", "PagePool", "PoolStats", "OutOfPages", "PagedBatch", "SeqPages",
    "pack_batch", "slot", "LRU", "FIFO", "Priority", "EvictionPolicy", "resolve_device",
    "PrefixCache", "PrefixCacheStats", "HostSwap", "SwapTicket", "OutOfHostPages", "Preempted", "Preemptor",
]
