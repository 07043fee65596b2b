"""Test-wide setup: GPU tests skip cleanly without a device; CPU runs of the CUDA kernels
use the Numba CUDA simulator (set before numba.cuda is first imported)."""
from __future__ import annotations

import os

import pytest

from pagemem.backend import cuda_unavailable_reason

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
