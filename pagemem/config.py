"""PoolConfig: the shape, dtype and device of a page pool, validated once."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagemem.backend import DEVICES, free_device_memory, resolve_device, to_dtype

_INT_FIELDS = ("num_pages", "page_size", "num_layers", "num_kv_heads", "head_dim")


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
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"PoolConfig.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"PoolConfig.{name} must be >= 1, got {value}")
        if self.num_pages < 2:
            raise ValueError(f"PoolConfig.num_pages must be >= 2 (page 0 is NULL_PAGE), got {self.num_pages}")
        try:
            object.__setattr__(self, "dtype", to_dtype(self.dtype).name)
        except ValueError as e:
            raise ValueError(f"PoolConfig.dtype: {e}") from None
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

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

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
        (or ``memory_bytes`` if given). On the CPU ``memory_bytes`` is required.
        """
        probe = cls(2, page_size, num_layers, num_kv_heads, head_dim, dtype, device)
        if memory_bytes is None:
            if resolve_device(device) != "cuda":
                raise ValueError("PoolConfig.from_memory: memory_bytes is required on the CPU")
            if not 0.0 < gpu_memory_utilization <= 1.0:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
            free, _total = free_device_memory()
            memory_bytes = int(free * gpu_memory_utilization)
        if memory_bytes < 2 * probe.page_bytes:
            raise ValueError(
                f"memory_bytes={memory_bytes} holds fewer than 2 pages of {probe.page_bytes} bytes"
            )
        return cls(memory_bytes // probe.page_bytes, page_size, num_layers, num_kv_heads, head_dim, dtype, device)
