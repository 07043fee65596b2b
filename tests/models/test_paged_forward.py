"""The paged forward equals a contiguous one: one-shot prefill vs chunks vs token-by-token decode,
and sequences mixed in one ragged batch vs run alone."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis_budget import scaled

from _helpers import prefill_logits, scale_error, scrambled_pool
from hf_models import ARCHS
from pagemem.models import load_model
from pagemem import SeqPages, pack_batch

PROMPT = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12, 13, 14]   # longer than Mistral's window of 8
# float32 everywhere; only the grouping of the same sums differs between paths
TOL = 1e-5


@functools.cache
def _model(path):
    return load_model(path, device="cpu")


def _chunked_logits(model, prompt: list[int], chunk: int, page_size: int) -> np.ndarray:
    """All-token logits of ``prompt`` fed ``chunk`` tokens per step (chunk 1 = decode steps)."""
    pool = scrambled_pool(model, -(-len(prompt) // page_size) + 1, page_size, seed=1)
    seq, rows = SeqPages(pool), []
    for start in range(0, len(prompt), chunk):
        new = prompt[start:start + chunk]
        seq.append(len(new))
        batch = pack_batch([seq], [len(new)], pool.xp)
        pos = np.arange(start, start + len(new))
        rows.append(model.forward(np.asarray(new), pos, batch, pool, all_logits=True))
    return np.concatenate(rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk, page_size", [(1, 4), (3, 4), (5, 1), (1, 16)])
def test_chunked_and_decode_equal_one_shot(hf_checkpoints, arch, chunk, page_size):
    """Feeding the prompt in chunks (or one token at a time) through the pool gives the one-shot logits."""
    model = load_model(hf_checkpoints[arch][0], device="cpu")
    one_shot = prefill_logits(model, [PROMPT], page_size=page_size)[0]
    assert scale_error(_chunked_logits(model, PROMPT, chunk, page_size), one_shot) <= TOL


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_mixed_prefill_and_decode_batch(hf_checkpoints, arch):
    """A decode token of one sequence and a prefill chunk of another, in one batch, get their solo logits."""
    model = load_model(hf_checkpoints[arch][0], device="cpu")
    a, b = PROMPT, [40, 41, 42, 43, 44]
    solo_a, solo_b = prefill_logits(model, [a])[0], prefill_logits(model, [b])[0]
    pool = scrambled_pool(model, 12, 4, seed=2)
    sa, sb = SeqPages(pool), SeqPages(pool)
    sa.append(len(a) - 1)                          # a's prefix first, alone
    batch = pack_batch([sa], [len(a) - 1], pool.xp)
    model.forward(np.asarray(a[:-1]), np.arange(len(a) - 1), batch, pool)
    sa.append(1)                                   # then a's last token with all of b
    sb.append(len(b))
    batch = pack_batch([sa, sb], [1, len(b)], pool.xp)
    ids = np.asarray([a[-1], *b])
    pos = np.asarray([len(a) - 1, *range(len(b))])
    logits = model.forward(ids, pos, batch, pool)  # [2, V]: each sequence's last token
    assert scale_error(logits[0], solo_a[-1]) <= TOL
    assert scale_error(logits[1], solo_b[-1]) <= TOL


def test_forward_rejects_mismatched_inputs(hf_checkpoints):
    model = load_model(hf_checkpoints["llama"][0], device="cpu")
    pool = scrambled_pool(model, 4, 4)
    seq = SeqPages(pool)
    seq.append(3)
    batch = pack_batch([seq], [3], pool.xp)
    with pytest.raises(ValueError, match="token_ids"):
        model.forward(np.asarray([1, 2]), np.arange(3), batch, pool)
    with pytest.raises(TypeError, match="positions"):
        model.forward(np.asarray([1, 2, 3]), np.arange(3.0), batch, pool)
    other = load_model(hf_checkpoints["gpt2"][0], device="cpu")   # 4 K/V heads, the pool has 2
    with pytest.raises(ValueError, match="num_kv_heads"):
        other.forward(np.asarray([1, 2, 3]), np.arange(3), batch, scrambled_pool(model, 4, 4))


def test_forward_writes_logits_into_out(hf_checkpoints):
    """``out=`` receives the logits forward returns (last token or, with all_logits, every
    token), and a wrong ``out`` is refused before any K/V reaches the pool."""
    model = load_model(hf_checkpoints["llama"][0], device="cpu")
    V, prompt = model.config.vocab_size, np.asarray(PROMPT[:6])
    want = prefill_logits(model, [PROMPT[:6]])[0]                        # [6, V]
    for all_logits, rows in ((False, 1), (True, 6)):
        pool = scrambled_pool(model, 4, 4, seed=3)
        seq = SeqPages(pool)
        seq.append(6)
        batch = pack_batch([seq], [6], pool.xp)
        before = pool.kv.copy()
        for bad in (np.zeros((rows + 1, V), np.float32), np.zeros((rows, V), np.float16)):
            with pytest.raises(ValueError, match="out"):
                model.forward(prompt, np.arange(6), batch, pool, all_logits=all_logits, out=bad)
            np.testing.assert_array_equal(pool.kv, before)
        out = np.full((rows + 2, V), np.nan, np.float32)
        view = out[1:rows + 1]
        assert model.forward(prompt, np.arange(6), batch, pool, all_logits=all_logits, out=view) is view
        assert scale_error(view, want[-rows:]) <= TOL
        assert np.isnan(out[0]).all() and np.isnan(out[-1]).all()


@settings(max_examples=scaled(15), deadline=None)
@given(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=6), min_size=1, max_size=3),
       st.sampled_from([1, 2, 8]))
def test_random_ragged_schedules(hf_checkpoints, chunks, page_size):
    """Sequences fed in random chunk sizes, interleaved in shared batches, get their one-shot logits
    (Mistral, so windows of 8 cross chunk and page boundaries)."""
    model = _model(hf_checkpoints["mistral"][0])
    prompts = [[(7 * s + 3 * i) % 300 for i in range(sum(c))] for s, c in enumerate(chunks)]
    pool = scrambled_pool(model, sum(-(-len(p) // page_size) for p in prompts) + 1, page_size, seed=3)
    seqs = [SeqPages(pool) for _ in prompts]
    got: list[list[np.ndarray]] = [[] for _ in prompts]
    for step in range(max(len(c) for c in chunks)):
        live = [s for s, c in enumerate(chunks) if step < len(c)]
        news = [prompts[s][seqs[s].num_tokens:seqs[s].num_tokens + chunks[s][step]] for s in live]
        starts = [seqs[s].num_tokens for s in live]
        for s, new in zip(live, news):
            seqs[s].append(len(new))
        batch = pack_batch([seqs[s] for s in live], [len(n) for n in news], pool.xp)
        ids = np.concatenate([np.asarray(n) for n in news])
        pos = np.concatenate([np.arange(a, a + len(n)) for a, n in zip(starts, news)])
        rows = np.split(model.forward(ids, pos, batch, pool, all_logits=True), np.cumsum([len(n) for n in news])[:-1])
        for s, r in zip(live, rows):
            got[s].append(r)
    for p, g in zip(prompts, got):
        assert scale_error(np.concatenate(g), prefill_logits(model, [p])[0]) <= TOL


def _lens_batch(query_lens, context_lens, page_size=16):
    """(a PagedBatch, its NumPy pool) of sequences of these lengths (contents unused)."""
    from pagemem import PagePool, PoolConfig
    pages = sum(-(-c // page_size) for c in context_lens) + 1
    pool = PagePool(PoolConfig(pages, page_size=page_size, num_layers=1, num_kv_heads=1, head_dim=8, device="cpu"))
    seqs = [SeqPages(pool) for _ in context_lens]
    for s, c in zip(seqs, context_lens):
        s.append(c)
    return pack_batch(seqs, query_lens, np), pool


def test_prefill_groups_written_out():
    """With a per-group cost of 10k the two short prompts share a call and the two long ones go
    alone: 2*12*16 + 500*512 + 520*528 + 3*10k = 560,944, less than any other cut (one group:
    4*520*528 + 10k = 1,108,240; four: 570,912). In a batch the decode row 0 is never grouped."""
    from pagemem.kernels.prefill import prefill_groups
    from pagemem.models.transformer import attention_groups
    lens = [10, 12, 500, 520]
    assert prefill_groups(lens, lens, 16, penalty=10_000) == [(0, 2), (2, 3), (3, 4)]
    assert prefill_groups(lens, lens, 16, penalty=10**9) == [(0, 4)]
    assert prefill_groups(lens, lens, 16, penalty=0) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    batch, pool = _lens_batch([1, *lens], [40, *lens])
    assert attention_groups(batch, pool) == [(1, 5)]      # the default cost: one call


@settings(max_examples=scaled(30), deadline=None)
@given(st.lists(st.integers(2, 200), min_size=2, max_size=6), st.integers(0, 20_000))
def test_prefill_groups_are_optimal(lens, penalty):
    """The dynamic programme's cost equals the best of every way to cut the rows."""
    import itertools
    from pagemem.kernels.prefill import prefill_groups

    def cost(groups):
        return sum((b - a) * max(lens[a:b]) * max(-(-c // 8) * 8 for c in lens[a:b]) + penalty for a, b in groups)
    n = len(lens)
    best = min(cost(list(zip((0, *cuts), (*cuts, n))))
               for k in range(n) for cuts in itertools.combinations(range(1, n), k))
    groups = prefill_groups(lens, lens, 8, penalty=penalty)
    assert [a for a, _ in groups[1:]] == [b for _, b in groups[:-1]] and groups[0][0] == 0 and groups[-1][1] == n
    assert cost(groups) == best


def test_prefill_groups_give_the_same_logits(hf_checkpoints, monkeypatch):
    """Prefill rows split into one call each (no per-group cost) get their solo logits."""
    import pagemem.kernels.prefill as prefill_route
    from pagemem.models.transformer import attention_groups
    monkeypatch.setattr(prefill_route, "GROUP_PENALTY", 0)
    model = load_model(hf_checkpoints["llama"][0], device="cpu")
    prompts = [PROMPT[:3], PROMPT[:9], PROMPT]
    solos = [prefill_logits(model, [p])[0][-1] for p in prompts]
    pool = scrambled_pool(model, 12, 4, seed=4)
    seqs = [SeqPages(pool) for _ in prompts]
    for s, p in zip(seqs, prompts):
        s.append(len(p))
    batch = pack_batch(seqs, [len(p) for p in prompts], pool.xp)
    assert attention_groups(batch, pool) == [(0, 1), (1, 2), (2, 3)]
    ids = np.concatenate([np.asarray(p) for p in prompts])
    pos = np.concatenate([np.arange(len(p)) for p in prompts])
    logits = model.forward(ids, pos, batch, pool)
    for got, want in zip(logits, solos):
        assert scale_error(got, want) <= TOL
