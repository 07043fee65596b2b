"""Batched GEMMs of the prefill path: cuBLAS strided-batched GEMM with float32 accumulation on
tensor cores for fp16/bf16 (CuPy's own 4-d fp16 matmul measured 22 ms where this is ~1 ms),
np.matmul for NumPy arrays (simulator tests)."""
from __future__ import annotations

import numpy as np

# cuBLAS enum values, shared with the graph-capturable GEMM (models/cublas_graph.py)
CUDA_TYPES = {"float16": 2, "bfloat16": 14, "float32": 0}   # cudaDataType: R_16F, R_16BF, R_32F
COMPUTE_32F = 68           # cublasComputeType_t CUBLAS_COMPUTE_32F
GEMM_DEFAULT = -1          # cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT
OP_N, OP_T = 0, 1          # cublasOperation_t


def cuda_type(dtype) -> int:
    """cudaDataType of an fp16, bf16 or fp32 dtype."""
    name = np.dtype(dtype).name
    if name not in CUDA_TYPES:
        raise TypeError(f"cuBLAS GEMMs here take float16, bfloat16 or float32, got {name}")
    return CUDA_TYPES[name]


def matmul(xp, a, b, transpose_b: bool, stream=None):
    """a [B, M, K] @ (b [B, N, K] transposed if transpose_b else b [B, K, N]) -> [B, M, N],
    all C-contiguous, result in a's dtype."""
    if xp is np:
        return np.matmul(a.astype(np.float32), (b.transpose(0, 2, 1) if transpose_b else b).astype(np.float32)
                         ).astype(a.dtype)
    batch, m, k = a.shape
    n = b.shape[1] if transpose_b else b.shape[2]
    c = xp.empty((batch, m, n), a.dtype)
    # Row-major C = A op(B) is column-major C^T = op(B)^T A^T: swap the operands.
    _gemm(xp, stream, OP_T if transpose_b else OP_N, OP_N, n, m, k,
          b, k if transpose_b else n, a, k, c, n, batch)
    return c


def _gemm(xp, stream, op_a, op_b, m, n, k, a, lda, b, ldb, c, ldc, batch) -> None:
    from cupy_backends.cuda.libs import cublas
    handle = xp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, (stream or xp.cuda.get_current_stream()).ptr)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    t = cuda_type(a.dtype)
    cublas.gemmStridedBatchedEx(
        handle, op_a, op_b, m, n, k, one.ctypes.data,
        a.data.ptr, t, lda, a.shape[1] * a.shape[2], b.data.ptr, t, ldb, b.shape[1] * b.shape[2],
        zero.ctypes.data, c.data.ptr, t, ldc, c.shape[1] * c.shape[2], batch, COMPUTE_32F, GEMM_DEFAULT)
