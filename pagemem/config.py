"""PoolConfig: the shape, dtype and device of a page pool, validated once; and the argument
checks the core's entry points share (``check_int``, ``check_fraction``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pagemem.backend import DEVICES, free_device_memory, resolve_device, to_dtype

_INT_FIELDS = ("num_pages", "page_size", "num_layers", "num_kv_heads", "head_dim")


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, for an argument called ``name``. TypeError unless it is an int or
    a NumPy integer (bools, floats, strings and NumPy bools are refused: none of them is a count or
    an id); ValueError outside [minimum, maximum]."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_fraction(value, name: str) -> float:
    """``value`` as a float in (0, 1]: TypeError unless a real number (not a bool or a string),
    ValueError for NaN, infinities and anything outside (0, 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Shape of the page-major K/V pool ``[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]``.

    ``num_pages`` counts NULL_PAGE (page 0), which is never handed out, so a pool
    holds ``num_pages - 1`` usable pages.
    """

    num_pages: int
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:  # stored as Python ints: a NumPy integer would leak into every count
            object.__setattr__(self, name, check_int(getattr(self, name), f"PoolConfig.{name}", 1))
        if self.num_pages < 2:
            raise ValueError(f"PoolConfig.num_pages must be >= 2 (page 0 is NULL_PAGE), got {self.num_pages}")
        try:
            object.__setattr__(self, "dtype", to_dtype(self.dtype).name)
        except ValueError as e:
            raise ValueError(f"PoolConfig.dtype: {e}") from None
        except TypeError as e:
            raise TypeError(f"PoolConfig.dtype: {e}") from None
        if not isinstance(self.device, str):
            raise TypeError(f"PoolConfig.device must be a str, one of {DEVICES}, got {type(self.device).__name__}")
        if self.device not in DEVICES:
            raise ValueError(f"PoolConfig.device must be one of {DEVICES}, got {self.device!r}")

    @property
    def np_dtype(self) -> np.dtype:
        return to_dtype(self.dtype)

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one page: [num_layers, 2, page_size, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return int(np.prod(self.page_shape)) * self.np_dtype.itemsize

    @classmethod
    def from_memory(
        cls,
        *,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str = "float16",
        device: str = "auto",
        gpu_memory_utilization: float = 0.9,
        memory_bytes: int | None = None,
    ) -> PoolConfig:
        """Size ``num_pages`` from memory, as vLLM's gpu_memory_utilization does.

        On CUDA the pool takes ``gpu_memory_utilization`` of the device's *free* memory
        (or ``memory_bytes`` if given). On the CPU ``memory_bytes`` is required. Every argument
        is checked before the device is asked anything.
        """
        probe = cls(2, page_size, num_layers, num_kv_heads, head_dim, dtype, device)
        gpu_memory_utilization = check_fraction(gpu_memory_utilization, "gpu_memory_utilization")
        if memory_bytes is not None:
            memory_bytes = check_int(memory_bytes, "memory_bytes", 1)
        else:
            if resolve_device(device) != "cuda":
                raise ValueError("PoolConfig.from_memory: memory_bytes is required on the CPU")
            free, _total = free_device_memory()
            memory_bytes = int(free * gpu_memory_utilization)
        if memory_bytes < 2 * probe.page_bytes:
            raise ValueError(
                f"memory_bytes={memory_bytes} holds fewer than 2 pages of {probe.page_bytes} bytes"
            )
        return cls(memory_bytes // probe.page_bytes, page_size, num_layers, num_kv_heads, head_dim, dtype, device)
