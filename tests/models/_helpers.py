"""Shared test helpers: run our model on one or more prompts through a fresh pool."""
from __future__ import annotations

import numpy as np

from pagemem.models import Model
from pagemem import PagePool, SeqPages, pack_batch
from pagemem.backend import to_host


def scrambled_pool(model: Model, num_pages: int, page_size: int, seed: int = 0) -> PagePool:
    """A pool whose free queue is in random order, so page tables are non-contiguous."""
    pool = PagePool(model.pool_config(num_pages, page_size))
    pages = pool.allocate(num_pages - 1)
    pool.free(list(np.random.default_rng(seed).permutation(pages).tolist()))
    return pool


def prefill_logits(model: Model, prompts: list[list[int]], page_size: int = 4) -> list[np.ndarray]:
    """All-token logits of each prompt, the prompts prefilled together in one ragged batch."""
    pages = sum(-(-len(p) // page_size) for p in prompts) + 1
    pool = scrambled_pool(model, pages, page_size)
    seqs = [SeqPages(pool) for _ in prompts]
    for s, p in zip(seqs, prompts):
        s.append(len(p))
    batch = pack_batch(seqs, [len(p) for p in prompts], pool.xp)
    ids = np.concatenate([np.asarray(p) for p in prompts])
    pos = np.concatenate([np.arange(len(p)) for p in prompts])
    logits = to_host(model.forward(ids, pos, batch, pool, all_logits=True))   # [T, V] float32
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def scale_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| relative to the reference logits' scale (max |ref|)."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
