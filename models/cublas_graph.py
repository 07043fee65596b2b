"""x @ w.T through cuBLAS called directly, so that a CUDA graph can capture it.

CuPy refuses any cuBLAS call while a stream is capturing (its ``setStream`` raises
NotImplementedError), although cuBLAS itself supports stream capture when the handle has a
preset workspace. This module keeps its own cuBLAS handle, bound once to the capture stream
with its own workspace, and calls ``cublasGemmEx`` through ctypes on the same libcublas that
CuPy loaded. It is used only by the decode graphs (models/cuda_graph.py).
"""
from __future__ import annotations

import ctypes

from pagemem.kernels.gemm import COMPUTE_32F, GEMM_DEFAULT, OP_N, OP_T, cuda_type


def _libcublas() -> ctypes.CDLL:
    """The libcublas CuPy uses (found in this process's mappings after CuPy creates its handle)."""
    import cupy as cp
    cp.cuda.device.get_cublas_handle()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublas.so" in line and "libcublasLt" not in line}
    if not paths:
        raise RuntimeError("libcublas is not loaded in this process")
    return ctypes.CDLL(sorted(paths)[0])


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class CapturableGemm:
    """``y = x @ w.T`` for x [T, in] and w [out, in] (fp16, bf16 or fp32, float32 accumulation),
    enqueued on ``stream`` whether or not it is capturing."""

    def __init__(self, stream, workspace_bytes: int = 32 << 20) -> None:
        import cupy as cp
        self.cp, self.lib = cp, _libcublas()
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        self.workspace = cp.empty(workspace_bytes, dtype=cp.uint8)   # kept alive with the handle
        _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                              ctypes.c_size_t(workspace_bytes)), "cublasSetWorkspace")
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def __call__(self, x, w):
        """x [T, in], w [out, in] (C- or F-contiguous) -> y [T, out] in x's dtype."""
        if x.dtype != w.dtype or x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"CapturableGemm: x {x.shape} {x.dtype} and w {w.shape} {w.dtype} do not match")
        x = self.cp.ascontiguousarray(x)
        t, k = x.shape
        n = w.shape[0]
        # Row-major y[T, n] is column-major y^T[n, T] = w @ x^T. A row-major w[n, k] read column-major
        # is w^T with ld k (so op T); an F-contiguous w (a transposed view) is w itself with ld n (op N).
        if w.flags.c_contiguous:
            op_a, lda = OP_T, k
        elif w.flags.f_contiguous:
            op_a, lda = OP_N, n
        else:
            raise ValueError("CapturableGemm: w must be C- or F-contiguous")
        y = self.cp.empty((t, n), dtype=x.dtype)
        dt = cuda_type(x.dtype)
        _check(self.lib.cublasGemmEx(
            self.handle, op_a, OP_N, n, t, k, ctypes.byref(self._alpha),
            ctypes.c_void_p(w.data.ptr), dt, lda, ctypes.c_void_p(x.data.ptr), dt, k, ctypes.byref(self._beta),
            ctypes.c_void_p(y.data.ptr), dt, n, COMPUTE_32F, GEMM_DEFAULT), "cublasGemmEx")
        return y

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and handle.value:
            self.lib.cublasDestroy_v2(handle)
