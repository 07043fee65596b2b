"""CPU/GPU backend selection: NumPy on the CPU, CuPy on CUDA devices.

Nothing here touches the GPU at import time; CuPy is imported lazily, the first
time a caller asks for ``device="cuda"`` or ``device="auto"``.
"""
from __future__ import annotations

import functools
from types import ModuleType

import ml_dtypes
import numpy as np

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can (CuPy present, driver and a device)."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e}); install pagemem[cuda12] or pagemem[cuda13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or a driver too old for this CuPy
        return f"CuPy is installed but the CUDA driver is not usable: {e}"
    if count == 0:
        return "CuPy and the CUDA driver are present but no CUDA device is visible"
    return None


def resolve_device(device: str = "auto") -> str:
    """Map "auto" | "cpu" | "cuda" to "cpu" or "cuda"; raise if "cuda" is asked for and missing."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, one of {DEVICES}, got {type(device).__name__}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if device == "cuda" and reason is not None:
        raise RuntimeError(f"device='cuda' was requested but {reason}")
    return "cpu" if reason is not None else "cuda"


def array_module(device: str) -> ModuleType:
    """numpy for "cpu", cupy for "cuda" (after resolve_device)."""
    if resolve_device(device) == "cuda":
        import cupy
        return cupy
    return np


def module_of(x) -> ModuleType:
    """The array module (numpy or cupy) an array belongs to."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        import cupy
        return cupy
    raise TypeError(f"expected a numpy or cupy array, got {type(x).__name__}")


def to_dtype(dtype) -> np.dtype:
    """Normalize "float16" | "bfloat16" | "float32" (or the numpy dtype) to a numpy dtype."""
    try:
        key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype must be one of {sorted(DTYPES)} or their NumPy dtype, "
                        f"got {type(dtype).__name__} {dtype!r}") from None
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[key]


def to_host(x) -> np.ndarray:
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    return x if isinstance(x, np.ndarray) else x.get()


def free_device_memory() -> tuple[int, int]:
    """(free_bytes, total_bytes) on the current CUDA device."""
    import cupy
    return cupy.cuda.runtime.memGetInfo()


def device_name_of(device: str) -> str:
    """A human name for "cpu" or "cuda" (the current CUDA device's name)."""
    if resolve_device(device) == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    import platform
    return f"CPU ({platform.machine()})"
