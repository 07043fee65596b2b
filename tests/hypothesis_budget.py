"""How many examples a property test draws: its own count times ``PAGEMEM_EXAMPLES_SCALE`` (an
int, default 1). The closing check of a change runs the suite once with the scale at 5 and
``HYPOTHESIS_PROFILE=explore`` (fresh random draws):

    HYPOTHESIS_PROFILE=explore PAGEMEM_EXAMPLES_SCALE=5 python -m pytest -q -o addopts= tests
"""
from __future__ import annotations

import os


def scale() -> int:
    text = os.environ.get("PAGEMEM_EXAMPLES_SCALE", "1")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"PAGEMEM_EXAMPLES_SCALE must be a positive int, got {text!r}") from None
    if value < 1:
        raise ValueError(f"PAGEMEM_EXAMPLES_SCALE must be a positive int, got {value}")
    return value


def scaled(n: int) -> int:
    """``n`` examples times the scale."""
    return n * scale()
