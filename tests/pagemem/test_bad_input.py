"""Bad input at every entry point of the core: TypeError or ValueError naming the argument, and
the pool, host swap and prefix cache exactly as they were (regression tests for issue 19's
findings: page 0 or a free page in a SeqPages, slots(-2, 2), a hand-made SwapTicket, floats,
bools, NumPy scalars of the wrong kind and NaN/inf sizes accepted silently)."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem import FIFO, LRU, HostSwap, OutOfPages, PagePool, PoolConfig, PrefixCache, Priority, SeqPages, SwapTicket, pack_batch, slot
from pagemem.eviction import make_policy

PS = 4


def state(pool: PagePool, swap: HostSwap | None = None, cache: PrefixCache | None = None) -> tuple:
    """Everything a failed call must leave as it was."""
    pool_state = (list(pool._refcount), list(pool._free), sorted(p for p in range(pool.num_pages) if p in pool.policy),
                  dict(pool._key_of), pool.num_evictions, pool.kv.tobytes())
    swap_state = () if swap is None else (swap._host_free.tolist(), len(swap._live), len(swap._pending),
                                          swap.host.tobytes(), swap.num_pages_out, swap.num_pages_in)
    return pool_state + swap_state + (() if cache is None else tuple(cache.stats()))


@pytest.fixture
def world():
    """A pool with pages 1-3 in use (page 3 cached under "k3"), 4-7 free; a HostSwap; a PrefixCache."""
    pool = PagePool(PoolConfig(8, PS, 1, 1, 8, "float16", "cpu"))
    used = pool.allocate(3)
    pool.cache_page(3, "k3")
    return pool, HostSwap(pool, 4), PrefixCache(pool), used


NAN, INF = float("nan"), float("inf")
POOL_CALLS = [
    ("can_allocate(1.5)", TypeError, "num_pages"),
    ("can_allocate(True)", TypeError, "num_pages"),
    ("can_allocate(np.float64(2))", TypeError, "num_pages"),
    ("can_allocate(-1)", ValueError, "num_pages"),
    ("allocate(np.bool_(True))", TypeError, "num_pages"),
    ("allocate(NAN)", TypeError, "num_pages"),
    ("allocate(2**70)", OutOfPages, "asked for"),  # an expected shortage, not a caller's type error
    ("layer_kv(0.0)", TypeError, "layer"),
    ("layer_kv(1)", ValueError, "layer"),
    ("refcount(1.0)", TypeError, "page_id"),
    ("free(1)", TypeError, "page_ids must be a sequence"),
    ("free({1, 2})", TypeError, "page_ids must be a sequence"),
    ("free([1], priority=np.float64(1))", TypeError, "priority"),
    ("free([1], priority=NAN)", TypeError, "priority"),
    ("free([[1]])", TypeError, "page_ids"),
    ("free([True])", TypeError, "page_ids"),
    ("share('12')", TypeError, "page_ids"),
    ("touch([2.0])", TypeError, "page_ids"),
    ("cache_page(1, [1, 2])", TypeError, "key"),
    ("lookup({'a': 1})", TypeError, "key"),
    ("is_cached(1.5)", TypeError, "page_id"),
    ("is_cached([3])", TypeError, "page_id"),
    ("cache_key(0)", ValueError, "page_id"),
    ("copy_page(1, 2.0)", TypeError, "page_ids"),
    ("stats('ab')", TypeError, "seqs"),
    ("stats([1, 2])", TypeError, "seqs"),
]


@pytest.mark.parametrize("call, exc, match", POOL_CALLS, ids=[c[0] for c in POOL_CALLS])
def test_pool_calls_reject_bad_values_and_change_nothing(world, call, exc, match):
    pool, swap, cache, _ = world
    before = state(pool, swap, cache)
    with pytest.raises(exc, match=match):
        eval("pool." + call)
    assert state(pool, swap, cache) == before
    pool.check_integrity()


SWAP_CALLS = [
    ("swap_out([1], priority='x')", TypeError, "priority"),
    ("swap_out([1], priority=1.5)", TypeError, "priority"),
    ("swap_out(np.array([1, 2]))", TypeError, "page_ids"),
    ("swap_out([1.0])", TypeError, "page_ids"),
    ("can_swap_out(1.5)", TypeError, "num_pages"),
    ("can_swap_out(-1)", ValueError, "num_pages"),
    ("bandwidth(['out'])", ValueError, "direction"),
    ("reclaim(wait='no')", TypeError, "wait"),
    ("wait(object())", TypeError, "ticket"),
    ("swap_in(SwapTicket([0], 64, owner=swap, slot_array=np.array([0])))", ValueError, "not issued"),
    ("discard(SwapTicket([0, 1], 128, owner=swap, slot_array=np.array([0, 1])))", ValueError, "not issued"),
]


@pytest.mark.parametrize("call, exc, match", SWAP_CALLS, ids=[c[0] for c in SWAP_CALLS])
def test_swap_calls_reject_bad_values_and_change_nothing(world, call, exc, match):
    pool, swap, cache, _ = world
    before = state(pool, swap, cache)
    with pytest.raises(exc, match=match):
        eval("swap." + call)
    assert state(pool, swap, cache) == before
    pool.check_integrity()
    swap.check_integrity()


def test_a_hand_made_ticket_cannot_swap_in_someone_elses_slots(world):
    """A ticket copied from a live one (same owner, slots and state) is refused; the real one works."""
    pool, swap, _, used = world
    real = swap.swap_out([used[0]])
    forged = SwapTicket(list(real.host_slots), real.nbytes, owner=swap, slot_array=real.slot_array)
    before = state(pool, swap)
    with pytest.raises(ValueError, match="not issued by this HostSwap"):
        swap.swap_in(forged)
    assert state(pool, swap) == before
    swap.swap_in(real)
    swap.check_integrity()


@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_host_pages=2.5), TypeError, "num_host_pages"),
    (dict(num_host_pages=True), TypeError, "num_host_pages"),
    (dict(num_bytes=INF), TypeError, "num_bytes"),
    (dict(num_bytes=NAN), TypeError, "num_bytes"),
    (dict(num_host_pages=2, min_run_bytes=NAN), TypeError, "min_run_bytes"),
    (dict(num_host_pages=2, staging_bytes=-1), ValueError, "staging_bytes"),
    (dict(num_host_pages=2, path=["auto"]), ValueError, "path"),
], ids=str)
def test_host_swap_sizes_are_checked(world, kw, exc, match):
    with pytest.raises(exc, match=match):
        HostSwap(world[0], **kw)


def test_direct_path_needs_whole_words_at_construction():
    """A pool of 6-byte pages cannot take the direct kernel: refused when the HostSwap is made,
    not at the first swap_out after host slots were taken."""
    pool = PagePool(PoolConfig(4, 1, 1, 1, 3, "float16", "cpu"))
    with pytest.raises(ValueError, match="path 'direct' needs pages of whole 8-byte words"):
        HostSwap(pool, 2, path="direct")


@pytest.mark.parametrize("table, tokens, exc, match", [
    ([0], 1, ValueError, "NULL_PAGE"),
    ([5], 1, ValueError, "free"),               # page 5 was never allocated
    ([1, 1], 5, ValueError, "repeat"),
    ([1.0], 1, TypeError, "page_table"),
    ([True], 1, TypeError, "page_table"),
    ("1", 1, TypeError, "page_table"),
    ([1], 1.0, TypeError, "num_tokens"),
    ([1], True, TypeError, "num_tokens"),
    ([1], 5, ValueError, "does not fit"),
], ids=str)
def test_seqpages_takes_only_pages_its_caller_holds(world, table, tokens, exc, match):
    pool, swap, cache, _ = world
    before = state(pool, swap, cache)
    with pytest.raises(exc, match=match):
        SeqPages(pool, table, tokens)
    assert state(pool, swap, cache) == before
    with pytest.raises(TypeError, match="pool"):
        SeqPages("pool")


@pytest.mark.parametrize("start, stop, exc", [(-2, 2, ValueError), (0, 9, ValueError), (3, 2, ValueError),
                                             (1.0, 2, TypeError), (0, True, TypeError)])
def test_slots_stay_inside_the_sequence(world, start, stop, exc):
    """slots(-2, 2) used to wrap around to the last page's tokens; now any range outside
    [0, num_tokens] is refused."""
    seq = SeqPages(world[0])
    seq.append(6)
    with pytest.raises(exc, match="start|stop"):
        seq.slots(start, stop)
    assert seq.slots(4, 6).tolist() == [slot(seq.page_table[1], o, PS) for o in (0, 1)]


@pytest.mark.parametrize("args, exc, match", [
    ((1.5, 0, PS), TypeError, "page_id"), ((1, 0.0, PS), TypeError, "offset"), ((1, PS, PS), ValueError, "offset"),
    ((-1, 0, PS), ValueError, "page_id"), ((1, 0, 0), ValueError, "page_size"), ((1, 0, True), TypeError, "page_size"),
    ((np.array([1.0]), np.array([0]), PS), TypeError, "page_id"), ((np.array([1]), np.array([-1]), PS), ValueError, "offset"),
], ids=str)
def test_slot_rejects_what_is_not_a_place_in_the_pool(args, exc, match):
    with pytest.raises(exc, match=match):
        slot(*args)
    assert slot(np.int32(2), 3, PS) == 11 and slot(np.array([2, 0]), np.array([3, 0]), PS).tolist() == [11, 0]


def test_pack_batch_checks_query_lens_and_seqs(world):
    pool = world[0]
    seq = SeqPages(pool, pool.allocate(1), 3)
    other = SeqPages(PagePool(PoolConfig(8, PS, 1, 1, 8, "float16", "cpu")))
    other.append(2)
    for q, exc, match in (([1.7], TypeError, "query_lens"), ([True], TypeError, "query_lens"),
                          ([NAN], TypeError, "query_lens"), ("1", TypeError, "query_lens"),
                          (np.array([1.0]), TypeError, "query_lens"), ([2**70], ValueError, "query_lens")):
        with pytest.raises(exc, match=match):
            pack_batch([seq], q)
    with pytest.raises(ValueError, match="another pool"):
        pack_batch([seq, other], [1, 1])
    with pytest.raises(TypeError, match="seqs"):
        pack_batch([object()], [1])
    assert pack_batch([seq], np.array([2])).slot_mapping.tolist() == seq.slots(1, 3).tolist()


@pytest.mark.parametrize("call, exc, match", [
    ("match(['1', '2', '3', '4', '5'])", TypeError, "token_ids"),
    ("match([1.5] * 5)", TypeError, "token_ids"),
    ("match([1, 2, 3, -4, 5])", ValueError, "token_ids"),
    ("match([2**64] * 5)", ValueError, "token_ids"),
    ("match(np.zeros(5))", TypeError, "token_ids"),
    ("peek('abcde')", TypeError, "token_ids"),
    ("page_keys([[1, 2, 3, 4]])", TypeError, "token_ids"),
    ("page_keys([1, 2, 3, 4], num_pages=INF)", TypeError, "num_pages"),
    ("page_keys([1, 2, 3, 4], start=-1)", ValueError, "start"),
    ("page_keys([1, 2, 3, 4], parent='x')", TypeError, "parent"),
    ("register(used, list(range(8)), start=-1)", ValueError, "start"),
    ("register(used, list(range(8)), start=4)", ValueError, "start"),
    ("register([1.0, 2], list(range(8)))", TypeError, "page_table"),
    ("register(used, [0.5] * 8)", TypeError, "token_ids"),
], ids=str)
def test_prefix_cache_checks_token_ids_before_counting(world, call, exc, match):
    """A refused call changes neither the index nor the hit statistics."""
    pool, swap, cache, used = world
    before = state(pool, swap, cache)
    with pytest.raises(exc, match=match):
        eval("cache." + call)
    assert state(pool, swap, cache) == before


@pytest.mark.parametrize("policy", [LRU, FIFO, Priority])
def test_policies_check_their_arguments(policy):
    pol = policy()
    pol.add(3, 1)
    for call, exc in (("remove(5)", ValueError), ("remove(3.0)", TypeError), ("add(3)", ValueError),
                      ("add(1.5)", TypeError), ("add(0)", ValueError), ("add(4, NAN)", TypeError),
                      ("add(4, '1')", TypeError), ("__contains__([3])", TypeError)):
        with pytest.raises(exc, match="page_id|priority"):
            eval("pol." + call)
    assert len(pol) == 1 and pol.pop_victim() == 3
    with pytest.raises(ValueError, match="no evictable page"):
        pol.pop_victim()
    pol.add(np.int64(4))
    assert type(pol.pop_victim()) is int


def test_make_policy_refuses_a_class_or_a_policy_in_use():
    with pytest.raises(TypeError, match="pass LRU()"):
        make_policy(LRU)
    used = LRU()
    used.add(1)
    with pytest.raises(ValueError, match="already holds 1 pages"):
        make_policy(used)
    with pytest.raises(TypeError, match="config"):
        PagePool("config")


@pytest.mark.parametrize("kw, exc, match", [
    (dict(dtype=[1, 2]), TypeError, "PoolConfig.dtype"),
    (dict(device=["cpu"]), TypeError, "PoolConfig.device"),
    (dict(num_pages=np.float64(8)), TypeError, "PoolConfig.num_pages"),
    (dict(page_size=np.bool_(True)), TypeError, "PoolConfig.page_size"),
], ids=str)
def test_pool_config_odd_values(kw, exc, match):
    args = dict(num_pages=8, page_size=4, num_layers=1, num_kv_heads=1, head_dim=8) | kw
    with pytest.raises(exc, match=match):
        PoolConfig(**args)
    cfg = PoolConfig(np.int64(8), np.int32(4), 1, 1, 8)
    assert type(cfg.num_pages) is int and type(cfg.page_size) is int


@pytest.mark.parametrize("kw, exc, match", [
    (dict(memory_bytes=INF), TypeError, "memory_bytes"),
    (dict(memory_bytes=1e9), TypeError, "memory_bytes"),
    (dict(memory_bytes=0), ValueError, "memory_bytes"),
    (dict(memory_bytes=1 << 20, gpu_memory_utilization=NAN), ValueError, "gpu_memory_utilization"),
    (dict(memory_bytes=1 << 20, gpu_memory_utilization=INF), ValueError, "gpu_memory_utilization"),
    (dict(memory_bytes=1 << 20, gpu_memory_utilization="0.5"), TypeError, "gpu_memory_utilization"),
    (dict(memory_bytes=1 << 20, gpu_memory_utilization=True), TypeError, "gpu_memory_utilization"),
], ids=str)
def test_from_memory_names_the_bad_size(kw, exc, match):
    with pytest.raises(exc, match=match):
        PoolConfig.from_memory(page_size=4, num_layers=1, num_kv_heads=1, head_dim=8, device="cpu", **kw)


def test_a_page_can_be_cached_under_the_key_none(world):
    pool = world[0]
    pool.cache_page(1, None)
    assert pool.is_cached(1) and pool.lookup(None) == 1 and pool.cache_key(1) is None
    pool.check_integrity()
