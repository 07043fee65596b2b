"""PrefixCache: reuse the pages of prompts that start the same way.

A full page is keyed by a hash chain over token ids:

    key(page i)    = (digest(page i - 1), tokens of page i)      digest(page -1) = ``root``
    digest(page i) = blake2b-128(digest(page i - 1) + tokens of page i)

so a page matches only if every page before it matched too (same tokens, same positions).
The key holds this page's tokens themselves: a lookup compares them exactly, and the parent
is a 128-bit cryptographic digest, so crafted prompts cannot collide a chain (Python's own
``hash`` of ints is deterministic and 64-bit; vLLM moved to sha256 for the same reason). Keys live in the pool's index (``PagePool.cache_page``),
so a freed cached page stays evictable in the pool's eviction policy until allocation needs it.

Ownership: ``match`` hands the caller one new reference to each matched page (``touch``);
``register`` only indexes pages the caller already owns and changes no refcount.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Hashable, NamedTuple, Sequence

import numpy as np

from pagemem.config import check_int
from pagemem.pool import PagePool

_MAX_TOKEN = (1 << 63) - 1  # token ids are hashed as int64


def _digest(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


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
        self.root = hashlib.blake2b(repr(("pagemem-prefix", root)).encode(), digest_size=16).digest()
        self._queries = self._query_tokens = self._hit_tokens = self._registered = 0

    def page_keys(self, token_ids: Sequence[int], num_pages: int | None = None, start: int = 0,
                  parent: bytes | None = None) -> list[tuple]:
        """The keys of full pages ``start .. num_pages - 1`` of ``token_ids`` (all full pages if
        num_pages is None). ``parent`` is the digest of page ``start - 1`` (root when start is 0).
        Changes nothing."""
        self._check_tokens(token_ids)
        if num_pages is not None:
            num_pages = check_int(num_pages, "num_pages", 0)
        start = check_int(start, "start", 0)
        if parent is not None and not (isinstance(parent, bytes) and len(parent) == len(self.root)):
            raise TypeError(f"parent must be None or a {len(self.root)}-byte digest, got {type(parent).__name__}")
        return self._keys(token_ids, num_pages, start, parent)

    def _keys(self, token_ids: Sequence[int], num_pages: int | None, start: int, parent: bytes | None) -> list[tuple]:
        """page_keys() of checked arguments."""
        ps = self.page_size
        full = len(token_ids) // ps
        num_pages = full if num_pages is None else min(num_pages, full)
        keys, parent = [], self.root if parent is None else parent
        for i in range(start, num_pages):
            key = (parent, tuple(int(t) for t in token_ids[i * ps:(i + 1) * ps]))
            keys.append(key)
            parent = _digest(*key)
        return keys

    def peek(self, token_ids: Sequence[int]) -> list[int]:
        """The pages match() would return, changing nothing: no reference, no statistics."""
        self._check_tokens(token_ids)
        return self._peek(token_ids)

    def _peek(self, token_ids: Sequence[int]) -> list[int]:
        pages = []
        for key in self._keys(token_ids, (len(token_ids) - 1) // self.page_size, 0, None):
            page_id = self.pool.lookup(key)
            if page_id is None:
                break
            pages.append(page_id)
        return pages

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The cached pages holding the longest cached prefix of ``token_ids``, in token order.

        Each returned page gets one new reference owned by the caller (revived from the eviction
        policy if it was evictable). At most ``(len(token_ids) - 1) // page_size`` pages match,
        so at least one token is left to compute: the model needs the last token's logits.
        """
        self._check_tokens(token_ids)
        pages = self._peek(token_ids)
        self._queries += 1
        self._query_tokens += len(token_ids)
        if pages:
            self.pool.touch(pages)
        self._hit_tokens += len(pages) * self.page_size
        return pages

    def register(self, page_table: Sequence[int], token_ids: Sequence[int], start: int = 0) -> int:
        """Index the full pages of a sequence whose K/V have been computed: page ``i`` of
        ``page_table`` must hold tokens ``token_ids[i*page_size:(i+1)*page_size]``. Pages already
        indexed, or whose key already names another page, are left as they are. Changes no
        refcount; returns how many pages were newly indexed.

        ``start``: pages before it were registered by an earlier call (a scheduler passes how
        many it registered last step), so only the new ones are hashed: O(new pages) per call.
        """
        self._check_tokens(token_ids)
        self.pool.check_page_ids(page_table, "page_table")
        if len(page_table) * self.page_size < len(token_ids):
            raise ValueError(f"page_table: {len(page_table)} pages cannot hold {len(token_ids)} tokens")
        start = check_int(start, "start", 0, len(page_table))
        keys = self._keys(token_ids, None, start, self._parent_of(page_table, token_ids, start))
        owned = page_table[start:start + len(keys)]
        for p in owned:
            if self.pool.refcount(p) == 0:
                raise ValueError(f"page_table: page {p} is free; register pages the sequence owns")
        added = 0
        for page_id, key in zip(owned, keys):
            if self.pool.lookup(key) is None and not self.pool.is_cached(page_id):
                added += self.pool.cache_page(page_id, key)
        self._registered += added
        return added

    def _parent_of(self, page_table: Sequence[int], token_ids: Sequence[int], start: int) -> bytes:
        """Digest of page ``start - 1``: from its key in the pool's index when it has one, else the chain."""
        if start == 0:
            return self.root
        key = self.pool.cache_key(page_table[start - 1])
        ps = self.page_size
        if key is not None and key[1] == tuple(int(t) for t in token_ids[(start - 1) * ps:start * ps]):
            return _digest(*key)
        keys = self._keys(token_ids, start, 0, None)
        return _digest(*keys[-1]) if keys else self.root

    def stats(self) -> PrefixCacheStats:
        """Counts since construction. Changes nothing."""
        return PrefixCacheStats(self._queries, self._query_tokens, self._hit_tokens, self._registered)

    @staticmethod
    def _check_tokens(token_ids: Sequence[int]) -> None:
        """TypeError unless ``token_ids`` is a sequence (or 1-d array) of ints, ValueError for an id
        outside [0, 2**63): C-level passes over the list, about 20 ns a token."""
        if isinstance(token_ids, np.ndarray):
            if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
                raise TypeError(f"token_ids must be a 1-d int array, got {token_ids.ndim}-d {token_ids.dtype}")
        elif isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TypeError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
        elif list(map(type, token_ids)).count(int) != len(token_ids):
            for i, t in enumerate(token_ids):
                check_int(t, f"token_ids[{i}]")
        if len(token_ids) and (min(token_ids) < 0 or max(token_ids) > _MAX_TOKEN):
            bad = next(i for i, t in enumerate(token_ids) if not 0 <= t <= _MAX_TOKEN)
            raise ValueError(f"token_ids[{bad}]={int(token_ids[bad])} is not a token id in [0, 2**63)")
