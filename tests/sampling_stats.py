"""Statistics for sampling tests: does a set of draws follow a target distribution?

A chi-square test at level 1e-6: a correct sampler fails it once in 10^6 seeds. Seeds in the
tests are fixed, so a pass is repeatable; the level bounds how likely a correct sampler would
have been to fail with some other fixed seed."""
from __future__ import annotations

import math

import numpy as np

ALPHA_Z = 4.753   # standard normal quantile of 1 - 1e-6


def chi2_critical(dof: int) -> float:
    """Upper 1e-6 quantile of chi-square(dof), Wilson-Hilferty (within 1% for dof >= 3)."""
    dof = max(dof, 3)
    return dof * (1 - 2 / (9 * dof) + ALPHA_Z * math.sqrt(2 / (9 * dof))) ** 3


def assert_matches(draws: np.ndarray, probs: np.ndarray) -> None:
    """draws [N] follow probs [V]: none outside its support, and the chi-square test passes."""
    counts = np.bincount(np.asarray(draws), minlength=probs.size)
    outside = np.flatnonzero((probs == 0) & (counts > 0))
    assert outside.size == 0, f"drew dropped tokens {outside.tolist()}"
    keep = probs > 0
    expected = probs[keep] * len(draws)
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = max(int(keep.sum()) - 1, 1)
    assert stat < chi2_critical(dof), f"chi-square {stat:.1f} over {dof} dof; counts {counts[keep].tolist()}"
