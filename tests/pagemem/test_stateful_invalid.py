"""The state machines of test_stateful.py, and one over HostSwap, with invalid calls mixed into the
valid ones: wrong types, NaN, inf, negatives, huge ints, empty and nested lists, strings for ids,
forged tickets. Each invalid call raises TypeError/ValueError (OutOfPages for a huge count: an
expected shortage) rather than being accepted silently, and afterwards the pool, host swap and
policy are exactly as before the call; the machines' own invariants (integrity, refcounts against
owners, page contents) keep holding around them. Values that make a valid no-op (an empty list of
page ids, "out" as a direction) are left out of the draws."""
from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from hypothesis_budget import scaled
from test_stateful import PAGE_SIZE, PoolMachine
from test_swap import InFlightSwap, fill_random_bits

from pagemem import OutOfPages, PagePool, PoolConfig, SeqPages, SwapTicket, pack_batch, slot

# Values that are never a count, an id or a flag. Ints are not among them (the ints drawn below are
# all out of range), so no call made of these can succeed by naming a real page.
JUNK = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.just(np.bool_(False)),
    st.builds(np.float64, st.floats(-4, 4)), st.text(max_size=3), st.none(), st.binary(max_size=2),
    st.just([]), st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=2),
    st.dictionaries(st.integers(0, 3), st.integers(0, 3), max_size=1), st.just(object()))
NEG, HUGE = st.integers(max_value=-1), st.one_of(st.integers(min_value=1 << 31), st.sampled_from([1 << 64, 1 << 100]))
BAD_INTS = st.one_of(NEG, HUGE, st.just(0))     # never a page id (0 is NULL_PAGE) nor a valid start
COUNTS = st.one_of(JUNK, BAD_INTS)
NOT_COUNTS = st.one_of(JUNK, NEG)               # where any count >= 0 is a valid question
NOT_EMPTY = JUNK.filter(lambda v: not (isinstance(v, (list, dict)) and len(v) == 0))   # [] frees no page
IDS = st.one_of(NOT_EMPTY, st.lists(st.one_of(JUNK, BAD_INTS), min_size=1, max_size=3),
                st.builds(np.array, st.lists(st.floats(0, 8), min_size=1, max_size=3)))
UNHASHABLE = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.integers(), st.integers(), max_size=1))


def pool_state(pool: PagePool) -> tuple:
    """Everything about a pool a failed call must leave as it was, its policy's order included."""
    return (list(pool._refcount), list(pool._free), repr(vars(pool.policy)), dict(pool._key_of),
            dict(pool._page_of), pool.num_evictions, pool.kv.tobytes())


def attempt(call, before: tuple, state) -> None:
    """Make ``call``: it must raise TypeError/ValueError (or OutOfPages), and ``state()``
    afterwards must equal ``before``."""
    try:
        result = call()
    except (TypeError, ValueError, OutOfPages):
        assert state() == before, "a refused call changed the state"
    else:
        raise AssertionError(f"an invalid call was accepted silently (returned {result!r})")


class InvalidPoolMachine(PoolMachine):
    """PoolMachine's rules plus invalid calls to the pool, SeqPages, pack_batch and slot."""

    def _calls(self, d) -> list:
        pool, seqs = self.pool, self._live()
        seq = d.draw(st.sampled_from(seqs)) if seqs else SeqPages(pool)
        raw = d.draw(st.sampled_from(self.raw)) if self.raw else 1
        long = [s for s in seqs if s.num_tokens >= 2] or [seq]   # float lens of 1..2 fit these
        return [
            lambda: pool.allocate(d.draw(COUNTS)), lambda: pool.can_allocate(d.draw(NOT_COUNTS)),
            lambda: pool.free(d.draw(IDS)), lambda: pool.share(d.draw(IDS)), lambda: pool.touch(d.draw(IDS)),
            lambda: pool.free([raw], priority=d.draw(JUNK)), lambda: pool.refcount(d.draw(COUNTS)),
            lambda: pool.layer_kv(d.draw(st.one_of(JUNK, NEG, HUGE))), lambda: pool.cache_key(d.draw(COUNTS)),
            lambda: pool.is_cached(d.draw(COUNTS)), lambda: pool.cache_page(raw, d.draw(UNHASHABLE)),
            lambda: pool.cache_page(d.draw(COUNTS), "key"), lambda: pool.lookup(d.draw(UNHASHABLE)),
            lambda: pool.copy_page(raw, d.draw(COUNTS)), lambda: pool.stats(d.draw(NOT_EMPTY)),
            # page_table=None is the constructor's default (an empty sequence): never drawn as junk here
            lambda: SeqPages(pool, d.draw(IDS.filter(lambda v: v is not None)),
                             d.draw(st.one_of(JUNK, BAD_INTS, st.integers(0, 8)))),
            lambda: seq.append(d.draw(st.one_of(JUNK, NEG, st.just(1 << 70)))),
            lambda: seq.try_grow(d.draw(NOT_COUNTS)),
            lambda: seq.num_pages_needed(d.draw(NOT_COUNTS)),
            lambda: seq.slots(d.draw(NOT_COUNTS), d.draw(COUNTS)),
            lambda: seq.free(d.draw(JUNK)),
            lambda: pack_batch(seqs or [seq], [d.draw(st.one_of(JUNK, BAD_INTS)) for _ in seqs or [seq]]),
            lambda: pack_batch(long, [d.draw(st.one_of(st.floats(1, 2), st.just(True))) for _ in long]),
            lambda: pack_batch(seqs or [seq], d.draw(st.lists(st.integers(1, 2), max_size=3).filter(
                lambda q: len(q) != len(seqs or [seq])))),
            lambda: pack_batch(d.draw(JUNK), [1]),
            lambda: slot(d.draw(NOT_COUNTS), 0, PAGE_SIZE),
            lambda: slot(1, d.draw(st.one_of(NOT_COUNTS, st.integers(PAGE_SIZE, 1 << 70))), PAGE_SIZE),
        ]

    def _state(self) -> tuple:
        return pool_state(self.pool), tuple((id(s), tuple(s.page_table), s.num_tokens) for s in self._live())

    @rule(data=st.data())
    def invalid_call(self, data):
        call = data.draw(st.sampled_from(self._calls(data)))
        attempt(call, self._state(), self._state)


class InvalidFIFOPoolMachine(InvalidPoolMachine):
    eviction = "fifo"


class InvalidPriorityPoolMachine(InvalidPoolMachine):
    eviction = "priority"


class SwapMachine(RuleBasedStateMachine):
    """Swap out, swap in, discard and reclaim over a HostSwap whose copies complete at random
    polls (InFlightSwap), with resident pages' contents and every ticket's pages tracked; invalid
    calls to every HostSwap method mixed in."""

    def __init__(self) -> None:
        super().__init__()
        coin = np.random.default_rng(0)
        self.pool = PagePool(PoolConfig(13, 2, 1, 1, 8, "float16", "cpu"))
        self.swap = InFlightSwap(self.pool, 8, coin=lambda: coin.random() < 0.4, staging_bytes=64)
        self.rng = np.random.default_rng(1)
        self.resident: dict[int, np.ndarray] = {}                   # page -> expected bits
        self.tickets: list[tuple[SwapTicket, list[np.ndarray]]] = []
        self.spent: list[SwapTicket] = []

    def _state(self) -> tuple:
        s = self.swap
        return (pool_state(self.pool), s._host_free.tolist(), sorted(map(id, s._live)), [id(p) for p in s._pending],
                s.host.tobytes(), s.num_pages_out, s.num_pages_in, [e._done for e in s.events])

    @rule(n=st.integers(1, 3))
    def allocate(self, n):
        if self.pool.can_allocate(n):
            self.resident.update(fill_random_bits(self.pool, self.pool.allocate(n), self.rng))

    @precondition(lambda self: self.resident)
    @rule(data=st.data(), priority=st.integers(0, 2))
    def swap_out(self, data, priority):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.resident)), min_size=1, max_size=3, unique=True))
        if self.swap.can_swap_out(len(ids)):
            self.tickets.append((self.swap.swap_out(ids, priority=priority), [self.resident.pop(p) for p in ids]))

    @precondition(lambda self: self.tickets)
    @rule(data=st.data(), discard=st.booleans())
    def swap_in_or_discard(self, data, discard):
        ticket, bits = self.tickets.pop(data.draw(st.integers(0, len(self.tickets) - 1)))
        if discard or not self.pool.can_allocate(ticket.num_pages):
            self.swap.discard(ticket)
        else:
            self.resident.update(zip(self.swap.swap_in(ticket), bits))
        self.spent.append(ticket)

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def free(self, data):
        p = data.draw(st.sampled_from(sorted(self.resident)))
        self.pool.free([p])
        del self.resident[p]

    @rule(wait=st.booleans())
    def reclaim(self, wait):
        self.swap.reclaim(wait=wait)

    def _calls(self, d) -> list:
        s = self.swap
        real = d.draw(st.sampled_from(sorted(self.resident))) if self.resident else 1
        live = [t for t, _ in self.tickets]
        forged = SwapTicket(list(live[0].host_slots), live[0].nbytes, owner=s, slot_array=live[0].slot_array) \
            if live else SwapTicket([0], 32, owner=s, slot_array=np.array([0]))
        bad_ticket = st.one_of(JUNK, st.just(forged), st.sampled_from(self.spent or [forged]))
        return [
            lambda: s.swap_out(d.draw(IDS)), lambda: s.swap_out([real], priority=d.draw(JUNK)),
            lambda: s.swap_in(d.draw(bad_ticket)), lambda: s.discard(d.draw(bad_ticket)),
            lambda: s.can_swap_out(d.draw(NOT_COUNTS)),
            lambda: s.reclaim(wait=d.draw(st.one_of(st.floats(), st.text(max_size=2), st.none(), st.integers()))),
            lambda: s.wait(d.draw(st.one_of(JUNK, st.just(SwapTicket([0], 32))))),
            lambda: s.bandwidth(d.draw(st.one_of(JUNK, st.text(max_size=3).filter(lambda t: t not in ("in", "out"))))),
        ]

    @rule(data=st.data())
    def invalid_call(self, data):
        call = data.draw(st.sampled_from(self._calls(data)))
        attempt(call, self._state(), self._state)

    @invariant()
    def consistent(self):
        self.pool.check_integrity()
        self.swap.check_integrity()
        for p, bits in self.resident.items():
            assert self.pool.refcount(p) == 1
            np.testing.assert_array_equal(self.pool.kv[p].view(np.uint16), bits.view(np.uint16))

    def teardown(self):
        for ticket, bits in self.tickets:          # every ticket still comes back bit-exact
            self.swap.reclaim(wait=True)
            if self.pool.can_allocate(ticket.num_pages):
                for p, b in zip(self.swap.swap_in(ticket), bits):
                    np.testing.assert_array_equal(self.pool.kv[p].view(np.uint16), b.view(np.uint16))
            else:
                self.swap.discard(ticket)
        self.swap.reclaim(wait=True)
        assert self.swap.num_free_host_pages == self.swap.num_host_pages and not self.swap._pending


_SETTINGS = settings(max_examples=scaled(60), stateful_step_count=50, deadline=None)
for _machine in (InvalidPoolMachine, InvalidFIFOPoolMachine, InvalidPriorityPoolMachine, SwapMachine):
    _machine.TestCase.settings = _SETTINGS
TestInvalidPoolMachine = InvalidPoolMachine.TestCase
TestInvalidFIFOPoolMachine = InvalidFIFOPoolMachine.TestCase
TestInvalidPriorityPoolMachine = InvalidPriorityPoolMachine.TestCase
TestSwapMachine = SwapMachine.TestCase
