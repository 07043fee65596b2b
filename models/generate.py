"""generate(): a small, non-continuous generation loop through the page pool.

All prompts are prefilled together in one ragged batch, then decoded together one token per
step until each stops. The continuous-batching engine (``pagemem.models.engine``) is the full version;
this one exists for tests, demos and as the reference for how the pieces fit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pagemem.models.model import Model
from pagemem import kernels
from pagemem.models.sampling import SamplingParams, pack_rows, request_seed, stop_reason
from pagemem import PagePool, SeqPages, pack_batch

GREEDY = SamplingParams(temperature=0.0)


def generate(model: Model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = GREEDY,
             *, page_size: int = 16, pool: PagePool | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt excluded). ``pool`` defaults to one just big enough;
    a given pool gets every page back at the end."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} params for {len(prompts)} prompts")
    if pool is None:
        pages = sum(-(-(len(p) + sp.max_tokens) // page_size) for p, sp in zip(prompts, params))
        pool = PagePool(model.pool_config(pages + 1, page_size))
    seqs = [SeqPages(pool) for _ in prompts]
    try:
        return _run(model, [list(map(int, p)) for p in prompts], params, seqs, pool)
    finally:
        for s in seqs:
            s.free()


def _run(model: Model, prompts: list[list[int]], params: list[SamplingParams], seqs: list[SeqPages],
         pool: PagePool) -> list[list[int]]:
    seeds = [request_seed(p, 0, i) for i, p in enumerate(params)]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    new_tokens = prompts                                           # per active sequence
    while active:
        for i, toks in zip(active, new_tokens):
            seqs[i].append(len(toks))
        batch = pack_batch([seqs[i] for i in active], [len(t) for t in new_tokens], pool.xp)
        token_ids = np.concatenate([np.asarray(t, dtype=np.int32) for t in new_tokens])   # [T]
        positions = np.concatenate([np.arange(seqs[i].num_tokens - len(t), seqs[i].num_tokens, dtype=np.int32)
                                    for i, t in zip(active, new_tokens)])                 # [T]
        logits = model.forward(token_ids, positions, batch, pool)                        # [len(active), V]
        packed = pack_rows([params[i] for i in active], [seeds[i] for i in active],
                           [seqs[i].num_tokens for i in active])          # position of each drawn token
        tokens = kernels.sample(logits, pool.xp.asarray(packed))
        tokens = tokens if isinstance(tokens, np.ndarray) else tokens.get()
        still = []
        for i, tok in zip(active, tokens.tolist()):
            outputs[i].append(tok)
            if stop_reason(params[i], tok, len(outputs[i]), model.eos_token_ids) is None:
                still.append(i)
        active, new_tokens = still, [[outputs[i][-1]] for i in still]
    return outputs
