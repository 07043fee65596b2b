"""Fixtures for model tests: tiny HF checkpoints written once per session."""
from __future__ import annotations

import pytest

from hf_models import ARCHS, save_hf_model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """arch -> (checkpoint folder, the torch model in float32)."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"hf_{arch}")
        out[arch] = (path, save_hf_model(arch, path))
    return out
