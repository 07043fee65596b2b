"""PoolConfig validation and sizing; backend selection."""
from __future__ import annotations

import os

import pytest

from pagemem import PoolConfig, resolve_device
from pagemem.backend import cuda_unavailable_reason


@pytest.mark.parametrize("field, value, exc", [
    ("num_pages", 1, ValueError), ("page_size", 0, ValueError), ("num_layers", -1, ValueError),
    ("num_kv_heads", 2.0, TypeError), ("head_dim", True, TypeError),
])
def test_bad_int_field_named(field, value, exc):
    kw = dict(num_pages=8, page_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
    kw[field] = value
    with pytest.raises(exc, match=f"PoolConfig.{field}"):
        PoolConfig(**kw)


def test_bad_dtype_and_device_named():
    with pytest.raises(ValueError, match="PoolConfig.dtype"):
        PoolConfig(8, 4, 2, 2, 8, dtype="int8")
    with pytest.raises(ValueError, match="PoolConfig.device"):
        PoolConfig(8, 4, 2, 2, 8, device="tpu")


def test_page_bytes_and_from_memory_on_cpu():
    cfg = PoolConfig.from_memory(page_size=16, num_layers=16, num_kv_heads=8, head_dim=128,
                                 dtype="float16", device="cpu", memory_bytes=10 << 20)
    assert cfg.page_bytes == 1 << 20          # Llama-3.2-1B: 1 MiB pages
    assert cfg.num_pages == 10
    with pytest.raises(ValueError, match="memory_bytes is required"):
        PoolConfig.from_memory(page_size=16, num_layers=1, num_kv_heads=1, head_dim=8, device="cpu")
    with pytest.raises(ValueError, match="fewer than 2 pages"):
        PoolConfig.from_memory(page_size=16, num_layers=1, num_kv_heads=1, head_dim=8, device="cpu",
                               memory_bytes=100)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")
    if cuda_unavailable_reason() is not None:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="device='cuda' was requested but"):
            resolve_device("cuda")
    else:
        assert resolve_device("auto") == "cuda"


def test_import_does_not_touch_cuda(tmp_path):
    """``import pagemem`` loads neither the kernels, the model layer, Numba nor CuPy. A stand-in
    ``cupy`` sits first on the path, so an import of CuPy shows where no real CuPy is installed."""
    import subprocess
    import sys
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("# a stand-in: its presence in sys.modules shows the import\n")
    code = ("import sys, pagemem; loaded = {'pagemem.kernels', 'pagemem.models', 'numba', 'cupy'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
