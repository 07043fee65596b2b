"""Greedy outputs against logits computed apart from the engine, with near ties stated.

A greedy token is the argmax of its position's logits. Two runs of the same weights may round
differently (another batch, another library, float32 against float64), so where the top two logits
are closer than the runs' rounding difference either token is right, and past it each run follows
its own continuation. These helpers compare token for token and accept a difference only at such
a near tie, measured on logits computed apart: one unbatched prefill of our model, or Hugging Face
transformers in float64.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from _helpers import prefill_logits

# Our float32 logits stay within 2e-6 of each other across batchings (the largest shift seen:
# 1.7e-6) and within 1.5e-5 of transformers' float64 ones on the tiny checkpoints; both margins
# leave a factor of 50 or more.
BATCH_MARGIN = 1e-4
HF_MARGIN = 1e-3

Logits = Callable[[list[int]], np.ndarray]   # token ids [T] -> logits [T, V] of that sequence alone


def ours(model) -> Logits:
    """Our model's logits of one sequence, prefilled alone (float32 -> float64)."""
    return lambda ids: prefill_logits(model, [list(ids)])[0].astype(np.float64)


def is_near_tie(row: np.ndarray, tokens: Sequence[int], margin: float) -> bool:
    """Every one of ``tokens`` is within ``margin`` of the row's largest logit."""
    top = float(row.max())
    return all(float(row[t]) >= top - margin for t in tokens)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_same_greedy(logits: Logits, prompts, got, want, margin: float = BATCH_MARGIN) -> int:
    """``got`` and ``want``: per prompt (token ids, finish reason) of two greedy runs. Each pair is
    equal, or equal up to a position whose two tokens are a near tie (within ``margin``) of
    ``logits`` on the shared prefix. A pair whose tokens agree but whose lengths or finish reasons
    differ is a real difference. Returns how many pairs parted at a near tie."""
    ties = 0
    for i, (prompt, (g, g_reason), (w, w_reason)) in enumerate(zip(prompts, got, want, strict=True)):
        if (list(g), g_reason) == (list(w), w_reason):
            continue
        k = first_difference(g, w)
        assert k is not None, f"request {i}: same tokens, different end: {g_reason} after {len(g)} " \
                              f"against {w_reason} after {len(w)}"
        row = logits(list(prompt) + list(w[:k]))[-1]
        assert is_near_tie(row, (g[k], w[k]), margin), \
            f"request {i}: token {k} is {g[k]}, the reference {w[k]}: logits {row[g[k]]:.6f} and " \
            f"{row[w[k]]:.6f}, max {row.max():.6f} (not within {margin})"
        ties += 1
    return ties


def assert_greedy_everywhere(logits: Logits, prompt, tokens, margin: float) -> None:
    """Teacher-forced: each of ``tokens`` is the argmax of ``logits`` on the prompt and the tokens
    before it, or within ``margin`` of it (a near tie)."""
    seq = list(prompt) + list(tokens)
    rows = logits(seq)[len(prompt) - 1:len(seq) - 1]              # [len(tokens), V]
    for k, (row, t) in enumerate(zip(rows, tokens)):
        assert is_near_tie(row, (t,), margin), \
            f"token {k} is {t} with logit {row[t]:.6f}; the argmax {int(row.argmax())} has {row.max():.6f}"
