"""PrefixCache: reuse the pages of prompts that start the same way.

A full page is keyed by a hash chain over token ids:

    key(page i)  = (hash(page i - 1), tokens of page i)      hash(page -1) = ``root``
    hash(page i) = hash(key(page i))

so a page matches only if every page before it matched too (same tokens, same positions).
The key holds this page's tokens themselves: a lookup compares them exactly, and only the
64-bit parent hash could collide. Keys live in the pool's index (``PagePool.cache_page``),
so a freed cached page stays evictable in the pool's eviction policy until allocation needs it.

Ownership: ``match`` hands the caller one new reference to each matched page (``touch``);
``register`` only indexes pages the caller already owns and changes no refcount.
"""
from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

from pagemem.pool import PagePool


class PrefixCacheStats(NamedTuple):
    num_queries: int        # calls to match()
    num_query_tokens: int   # prompt tokens offered to match()
    num_hit_tokens: int     # tokens served from cached pages
    num_registered: int     # pages newly indexed by register()

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class PrefixCache:
    """The hash-chain index over one PagePool's full pages, with hit statistics.

    ``root`` salts the chain (a model or adapter id): two caches with different roots over the
    same pool never share pages.
    """

    def __init__(self, pool: PagePool, root: Hashable = 0) -> None:
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, got {type(pool).__name__}")
        self.pool = pool
        self.page_size = pool.page_size
        self.root = hash(("pagemem-prefix", root))
        self._queries = self._query_tokens = self._hit_tokens = self._registered = 0

    def page_keys(self, token_ids: Sequence[int], num_pages: int | None = None) -> list[tuple]:
        """The keys of the first ``num_pages`` full pages of ``token_ids`` (all full pages if None)."""
        ps = self.page_size
        full = len(token_ids) // ps
        num_pages = full if num_pages is None else min(num_pages, full)
        keys, parent = [], self.root
        for i in range(num_pages):
            key = (parent, tuple(int(t) for t in token_ids[i * ps:(i + 1) * ps]))
            keys.append(key)
            parent = hash(key)
        return keys

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The cached pages holding the longest cached prefix of ``token_ids``, in token order.

        Each returned page gets one new reference owned by the caller (revived from the eviction
        policy if it was evictable). At most ``(len(token_ids) - 1) // page_size`` pages match,
        so at least one token is left to compute: the model needs the last token's logits.
        """
        self._check_tokens(token_ids)
        self._queries += 1
        self._query_tokens += len(token_ids)
        pages = []
        for key in self.page_keys(token_ids, (len(token_ids) - 1) // self.page_size):
            page_id = self.pool.lookup(key)
            if page_id is None:
                break
            pages.append(page_id)
        if pages:
            self.pool.touch(pages)
        self._hit_tokens += len(pages) * self.page_size
        return pages

    def register(self, page_table: Sequence[int], token_ids: Sequence[int]) -> int:
        """Index the full pages of a sequence whose K/V have been computed: page ``i`` of
        ``page_table`` must hold tokens ``token_ids[i*page_size:(i+1)*page_size]``. Pages already
        indexed, or whose key already names another page, are left as they are. Changes no
        refcount; returns how many pages were newly indexed."""
        self._check_tokens(token_ids)
        if len(page_table) * self.page_size < len(token_ids):
            raise ValueError(f"page_table: {len(page_table)} pages cannot hold {len(token_ids)} tokens")
        keys = self.page_keys(token_ids)
        self.pool._check_ids(page_table[:len(keys)], "page_table")
        for p in page_table[:len(keys)]:
            if self.pool.refcount(p) == 0:
                raise ValueError(f"page_table: page {p} is free; register pages the sequence owns")
        added = 0
        for page_id, key in zip(page_table, keys):
            if self.pool.lookup(key) is None and not self.pool.is_cached(page_id):
                added += self.pool.cache_page(page_id, key)
        self._registered += added
        return added

    def stats(self) -> PrefixCacheStats:
        """Counts since construction. Changes nothing."""
        return PrefixCacheStats(self._queries, self._query_tokens, self._hit_tokens, self._registered)

    @staticmethod
    def _check_tokens(token_ids: Sequence[int]) -> None:
        if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
            raise TypeError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
