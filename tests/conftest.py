"""Test-wide setup: GPU tests skip cleanly without a device; CPU runs of the CUDA kernels
use the Numba CUDA simulator (set before numba.cuda is first imported).

Property tests draw the same examples on every run (hypothesis' ``derandomize``), so a test
run is reproducible and CI does not pass or fail by the luck of the draw. To search new
examples, run with ``HYPOTHESIS_PROFILE=explore`` (random draws), and with
``PAGEMEM_EXAMPLES_SCALE=5`` for five times every test's examples (tests/hypothesis_budget.py); a failure
prints the ``@reproduce_failure`` blob to pin it down, and each one found becomes a plain
regression test."""
from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import settings
from hypothesis_budget import scaled

if importlib.util.find_spec("pagemem.kernels") is None:   # the folders are importable only once installed
    raise pytest.UsageError("pagemem.kernels is not importable: install the project first, "
                            "`pip install -e \".[test]\"` (or `pip install --no-deps --no-build-isolation -e .`)")

from pagemem.backend import cuda_unavailable_reason

settings.register_profile("repeatable", derandomize=True, print_blob=True, max_examples=scaled(100))
settings.register_profile("explore", derandomize=False, print_blob=True, max_examples=scaled(100))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

_NO_CUDA = cuda_unavailable_reason()
if _NO_CUDA is not None:
    # No device: kernels' CUDA paths run under the simulator at tiny sizes.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def pytest_collection_modifyitems(config, items):
    if _NO_CUDA is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device: {_NO_CUDA}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
