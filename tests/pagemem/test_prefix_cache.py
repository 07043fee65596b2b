"""PrefixCache: hash-chain keys, hits that take references, registration, statistics."""
from __future__ import annotations

import pytest

from pagemem import PagePool, PoolConfig, PrefixCache, SeqPages

PS = 4


def make(num_pages: int = 9, eviction=None):
    pool = PagePool(PoolConfig(num_pages, PS, 1, 1, 4, "float32", "cpu"), eviction=eviction)
    return pool, PrefixCache(pool)


def prefill(pool: PagePool, cache: PrefixCache, tokens: list[int]) -> SeqPages:
    """What a scheduler does: reuse hits, allocate the rest, 'compute', register full pages."""
    hits = cache.match(tokens)
    seq = SeqPages(pool, hits, len(hits) * PS)
    seq.append(len(tokens) - seq.num_tokens)
    cache.register(seq.page_table, tokens)
    pool.check_integrity()
    return seq


def test_keys_chain_over_parent_pages():
    _, cache = make()
    a = cache.page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = cache.page_keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2                   # only full pages have keys
    assert a[0][1] == (1, 2, 3, 4)
    assert a[1][1] == b[1][1] and a[1] != b[1]           # same tokens, different parent: no match


def test_second_prompt_reuses_cached_pages_with_a_reference():
    pool, cache = make()
    first = prefill(pool, cache, list(range(1, 11)))     # pages A B C; A, B full and registered
    a, b, c = first.page_table
    second = prefill(pool, cache, list(range(1, 9)) + [50, 51, 52])
    assert second.page_table[:2] == [a, b]
    assert pool.refcount(a) == pool.refcount(b) == 2 and second.page_table[2] != c
    s = cache.stats()
    assert (s.num_queries, s.num_query_tokens, s.num_hit_tokens) == (2, 21, 8)
    assert s.hit_rate == pytest.approx(8 / 21)


def test_match_leaves_the_last_token_to_compute():
    pool, cache = make()
    prefill(pool, cache, list(range(1, 9)))              # two full pages registered
    hits = cache.match(list(range(1, 9)))                # the same 8 tokens: only page 1 may hit
    assert len(hits) == 1
    pool.free(hits)


def test_freed_cached_pages_are_revived_until_evicted():
    """Cached pages outlive their sequence in the eviction policy; a later hit revives them."""
    pool, cache = make(num_pages=5)                       # 4 usable pages
    seq = prefill(pool, cache, list(range(1, 10)))        # pages p1 p2 (full, cached), p3 (partial)
    p1, p2, p3 = seq.page_table
    seq.free()                                            # tail first: clean free <- p3; policy: p2 -> p1
    assert pool.stats().num_cached == 2
    again = cache.match(list(range(1, 10)))
    assert again == [p1, p2] and pool.stats().num_cached == 0
    pool.free(again[::-1])                                # policy: p2 -> p1
    pool.allocate(2)                                      # the two clean pages first (p3, the 4th)
    pool.allocate(1)                                      # then evicts p2, the tail of the prefix
    assert cache.match(list(range(1, 10))) == [p1]        # the chain now stops after p1
    pool.check_integrity()


def test_register_is_idempotent_and_skips_duplicates():
    pool, cache = make()
    tokens = list(range(1, 9))
    seq = SeqPages(pool)
    seq.append(8)
    assert cache.register(seq.page_table, tokens) == 2
    assert cache.register(seq.page_table, tokens) == 0    # already indexed
    twin = SeqPages(pool)
    twin.append(8)                                        # same tokens computed twice
    assert cache.register(twin.page_table, tokens) == 0   # keys name the first copy
    assert cache.stats().num_registered == 2
    pool.check_integrity()


def test_register_bad_input_changes_nothing():
    pool, cache = make()
    seq = SeqPages(pool)
    seq.append(4)
    with pytest.raises(ValueError, match="cannot hold"):
        cache.register(seq.page_table, list(range(8)))
    with pytest.raises(ValueError, match="is free"):
        cache.register([7], list(range(4)))
    with pytest.raises(TypeError, match="token_ids"):
        cache.match("abcd")
    assert cache.stats().num_registered == 0 and not pool.is_cached(seq.page_table[0])
    pool.check_integrity()


def test_roots_separate_caches_over_one_pool():
    pool = PagePool(PoolConfig(9, PS, 1, 1, 4, "float32", "cpu"))
    a, b = PrefixCache(pool, root="model-a"), PrefixCache(pool, root="model-b")
    seq = prefill(pool, a, list(range(1, 10)))
    assert b.match(list(range(1, 10))) == []
    assert a.match(list(range(1, 10))) == seq.page_table[:2]
