"""Device plumbing shared by the CUDA kernels and launchers.

- ``SIM``: True under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has no warp
  shuffles, no LLVM intrinsics and no bf16; every helper below has a plain-Python twin there.
- Storage kinds ``F16``, ``BF16``, ``F32``: kernels read 16-bit data as raw ``uint16`` bits (or
  as ``uint64`` words of four values) and convert in registers, because scalar fp16 loads cap
  Numba near 1.3 TB/s and Numba has no bf16 type at all.
Arrays, streams and launches live in kernels/_arrays.py.
"""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
from numba import cuda, float32, types, uint16, uint32, uint64
from numba.cuda.core import config

SIM = bool(config.ENABLE_CUDASIM)
F16, BF16, F32 = 0, 1, 2
_KINDS = {np.dtype(np.float16): F16, np.dtype(ml_dtypes.bfloat16): BF16, np.dtype(np.float32): F32}
KIND_DTYPES = {kind: dtype for dtype, kind in _KINDS.items()}    # F16 | BF16 | F32 -> its dtype
FULL_MASK = 0xFFFFFFFF


def dtype_kind(dtype, name: str) -> int:
    """F16 | BF16 | F32 for a supported dtype; TypeError naming the argument otherwise."""
    kind = _KINDS.get(np.dtype(dtype))
    if kind is None:
        raise TypeError(f"{name}: dtype must be float16, bfloat16 or float32, got {np.dtype(dtype)}")
    return kind


def bits_dtype(kind: int) -> np.dtype:
    """The dtype a kernel sees for scalar data of this kind: raw bits for 16-bit floats."""
    return np.dtype(np.float32) if kind == F32 else np.dtype(np.uint16)


# ---- bit-level conversions (one instruction each on the device) -------------------------------
if SIM:
    def half_to_f32(x):
        return np.float32(np.uint16(int(x) & 0xFFFF).view(np.float16))

    def bits_to_f32(x):
        return np.uint32(int(x) & 0xFFFFFFFF).view(np.float32)

    def f32_to_half_bits(x):
        return np.float16(x).view(np.uint16)

    def f32_to_bits(x):
        return int(np.float32(x).view(np.uint32))
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _resize(builder, val, width):
        if val.type.width == width:
            return val
        return builder.trunc(val, ir.IntType(width)) if val.type.width > width else builder.zext(val, ir.IntType(width))

    @intrinsic
    def half_to_f32(typingctx, x):
        """float32 of the fp16 in the low 16 bits of integer x (cvt.f32.f16)."""
        def codegen(context, builder, sig, args):
            h = builder.bitcast(_resize(builder, args[0], 16), ir.HalfType())
            return builder.fpext(h, ir.FloatType())
        return types.float32(x), codegen

    @intrinsic
    def bits_to_f32(typingctx, x):
        """float32 whose bits are the low 32 bits of integer x (a register move)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(_resize(builder, args[0], 32), ir.FloatType())
        return types.float32(x), codegen

    @intrinsic
    def f32_to_half_bits(typingctx, x):
        """uint16 bits of float32 x rounded to fp16 (cvt.rn.f16.f32)."""
        def codegen(context, builder, sig, args):
            h = builder.fptrunc(args[0], ir.HalfType())
            return builder.bitcast(h, ir.IntType(16))
        return types.uint16(types.float32), codegen

    @intrinsic
    def f32_to_bits(typingctx, x):
        """uint32 bits of float32 x."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen


def _bf16_to_f32(x):
    return bits_to_f32(uint32(x) << uint32(16))


def _f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16 bits; NaN stays NaN."""
    if x != x:
        return uint16(0x7FC0)
    u = uint32(f32_to_bits(x))
    return uint16((u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16))


def _f32_identity(x):
    return float32(x)


def _maybe_jit(fn):
    return fn if SIM else cuda.jit(device=True)(fn)


load_scalar = {F16: half_to_f32, BF16: _maybe_jit(_bf16_to_f32), F32: _f32_identity if SIM else _maybe_jit(_f32_identity)}
store_scalar = {F16: f32_to_half_bits, BF16: _maybe_jit(_f32_to_bf16_bits), F32: load_scalar[F32]}


def _unpack_f16(w, e):
    return half_to_f32(w >> uint64(16 * e))


def _unpack_bf16(w, e):
    return bits_to_f32((w >> uint64(16 * e)) << uint64(16))


def _unpack_f32(w, e):
    return bits_to_f32(w >> uint64(32 * e))


# unpack[kind](word, e): element e (0..3 for 16-bit, 0..1 for fp32) of a uint64 word, as float32.
unpack = {F16: _maybe_jit(_unpack_f16), BF16: _maybe_jit(_unpack_bf16), F32: _maybe_jit(_unpack_f32)}
ELEMS_PER_WORD = {F16: 4, BF16: 4, F32: 2}


@functools.cache
def make_group_sum(lanes: int):
    """group_sum(v, scratch, tid): sum of v over the ``lanes`` aligned threads of tid's group,
    returned to every one of them. Device: xor shuffles. Simulator: a shared ``scratch``
    [block_threads] float32 and two barriers, so callers must reach it in block-uniform flow."""
    if SIM:
        @cuda.jit(device=True)
        def group_sum(v, scratch, tid):
            scratch[tid] = v
            cuda.syncthreads()  # every lane's partial is written
            base = tid - tid % lanes
            total = float32(0)
            for i in range(lanes):
                total += scratch[base + i]
            cuda.syncthreads()  # every lane has read before scratch is reused
            return total
        return group_sum

    @cuda.jit(device=True)
    def group_sum(v, scratch, tid):
        off = lanes >> 1
        while off > 0:
            v += cuda.shfl_xor_sync(FULL_MASK, v, off)
            off >>= 1
        return v
    return group_sum


@functools.cache
def make_block_reduce(threads: int, is_max: bool):
    """block_reduce(v, sm, tid): max (is_max) or sum of v over the block of ``threads`` threads,
    returned to every thread. ``sm``: shared float32 [threads] (the simulator's tree uses all of
    it, the device only [threads // 32]). Call in block-uniform flow: it has barriers."""
    NT = threads
    if NT < 1 or NT & (NT - 1):
        raise ValueError(f"block_reduce: threads must be a power of two, got {threads}")
    if SIM or NT < 32:
        @cuda.jit(device=True)
        def block_reduce(v, sm, tid):
            sm[tid] = v
            cuda.syncthreads()  # all partials written
            stride = NT // 2
            while stride > 0:
                if tid < stride:
                    sm[tid] = max(sm[tid], sm[tid + stride]) if is_max else sm[tid] + sm[tid + stride]
                cuda.syncthreads()  # this level done before the next reads it
                stride //= 2
            total = sm[0]
            cuda.syncthreads()  # everyone has read sm[0] before sm is reused
            return total
        return block_reduce

    NW = NT // 32

    @cuda.jit(device=True)
    def block_reduce(v, sm, tid):
        off = 16
        while off > 0:  # within the warp
            o = cuda.shfl_xor_sync(FULL_MASK, v, off)
            v = max(v, o) if is_max else v + o
            off >>= 1
        if tid % 32 == 0:
            sm[tid // 32] = v
        cuda.syncthreads()  # every warp's result written
        total = sm[0]
        for i in range(1, NW):
            total = max(total, sm[i]) if is_max else total + sm[i]
        cuda.syncthreads()  # everyone has read before sm is reused
        return total
    return block_reduce
