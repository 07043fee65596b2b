"""Device plumbing shared by the CUDA kernels and launchers.

- ``SIM``: True under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has no warp
  shuffles, no LLVM intrinsics and no bf16; every helper below has a plain-Python twin there.
- Storage kinds ``F16``, ``BF16``, ``F32``: kernels read 16-bit data as raw ``uint16`` bits (or
  as ``uint64`` words of four values) and convert in registers, because scalar fp16 loads cap
  Numba near 1.3 TB/s and Numba has no bf16 type at all.
- ``as_device(x, dtype)``: a CuPy array as a Numba device array (optionally reinterpreted as
  another dtype) without a stream sync; NumPy arrays pass through (simulator).
"""
from __future__ import annotations

import functools
import os

import ml_dtypes
import numpy as np
from numba import cuda, float32, types, uint16, uint32, uint64
from numba.cuda.core import config

SIM = bool(config.ENABLE_CUDASIM)
F16, BF16, F32 = 0, 1, 2
_KINDS = {np.dtype(np.float16): F16, np.dtype(ml_dtypes.bfloat16): BF16, np.dtype(np.float32): F32}
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


# ---- arrays and streams ----------------------------------------------------------------------
def is_device_array(x) -> bool:
    """A CUDA array (CuPy), told by its class so CuPy's interface dict is not built."""
    return not isinstance(x, np.ndarray) and hasattr(type(x), "__cuda_array_interface__")


_views: dict = {}


def as_device(x, dtype=None):
    """``x`` (CuPy) as a Numba device array, reinterpreted as ``dtype`` along its last axis.

    No stream sync (unlike passing CuPy arrays to a launch: 69 vs 22.5 us per launch), and the
    view is cached by (pointer, shape, strides, dtype): it holds no reference to ``x``, so the
    caller keeps ``x`` alive for the launch, as every launcher does. NumPy arrays (simulator only)
    are wrapped in place. The last axis must be contiguous when the itemsize changes.
    """
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    if isinstance(x, np.ndarray):
        return _sim_array(x if x.dtype == dtype else x.view(dtype))
    ptr, shape, strides = _pointer_shape_strides(x)
    itemsize = np.dtype(x.dtype).itemsize
    if dtype.itemsize != itemsize:
        shape = shape[:-1] + (shape[-1] * itemsize // dtype.itemsize,)
        strides = tuple(strides[:-1]) + (dtype.itemsize,)
    key = (ptr, shape, tuple(strides), dtype.str)
    view = _views.get(key)
    if view is None:
        if len(_views) > 512:
            _views.clear()
        desc = {"shape": shape, "strides": tuple(strides), "typestr": dtype.str,
                "data": (ptr, False), "version": 3}
        view = _views[key] = cuda.from_cuda_array_interface(desc, owner=None, sync=False)
    return view


def as_flat_words(x):
    """(flat, strides): the 4-d cache ``x`` [num_pages, page_size, num_kv_heads, head_dim] as one
    flat uint64 array spanning it, and its first three strides in words. Kernels then index
    ``flat[page * s0 + token * s1 + head * s2 + word]`` with unsigned integers."""
    if isinstance(x, np.ndarray):
        ptr, shape, strides = x.__array_interface__["data"][0], x.shape, x.strides
    else:
        ptr, shape, strides = _pointer_shape_strides(x)
    extent = sum((n - 1) * st for n, st in zip(shape, strides)) + shape[-1] * np.dtype(x.dtype).itemsize
    words = tuple(st // 8 for st in strides[:3])
    if isinstance(x, np.ndarray):
        flat = np.lib.stride_tricks.as_strided(x.view(np.uint64), shape=(extent // 8,), strides=(8,))
        return _sim_array(flat), words
    key = (ptr, (extent // 8,), (8,), "<u8")
    view = _views.get(key)
    if view is None:
        desc = {"shape": (extent // 8,), "strides": (8,), "typestr": "<u8", "data": (ptr, False), "version": 3}
        view = _views[key] = cuda.from_cuda_array_interface(desc, owner=None, sync=False)
    return view, words


def _sim_array(x: np.ndarray):
    """Wrap a NumPy array so the simulator uses it in place (it copies, and so rejects,
    non-contiguous NumPy arguments)."""
    if not SIM:
        raise TypeError("NumPy arrays reach CUDA kernels only under the simulator")
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(x)


def _pointer_shape_strides(x):
    data = getattr(x, "data", None)
    if hasattr(data, "ptr"):  # CuPy: no interface dict per call
        return data.ptr, tuple(x.shape), tuple(x.strides)
    cai = x.__cuda_array_interface__
    itemsize = np.dtype(x.dtype).itemsize
    return cai["data"][0], tuple(cai["shape"]), tuple(cai["strides"] or _c_strides(cai["shape"], itemsize))


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int):
    return cuda.external_stream(ptr)


@functools.cache
def num_sms() -> int:
    """Multiprocessor count of the current device (132 assumed in the simulator)."""
    if SIM:
        return 132
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


_compiled: dict = {}
# PAGEMEM_RAW_LAUNCH=0 relaunches through Numba instead of CuPy (a fallback for debugging).
RAW_LAUNCH = os.environ.get("PAGEMEM_RAW_LAUNCH", "1") != "0"


def launch(kernel, grid, block, stream, *args) -> None:
    """``kernel[grid, block, stream](*args)`` with ``stream`` a CuPy stream (None: current).

    The first launch of each argument signature goes through Numba (compiling if needed); later
    ones launch the same cubin through CuPy with Numba's flattened argument ABI, which costs a
    fraction of Numba's per-launch typing and marshalling of ~100 parameters."""
    if SIM:
        kernel[grid, block, 0](*args)
        return
    import cupy
    stream = cupy.cuda.get_current_stream() if stream is None else stream
    key = (kernel, *map(_arg_key, args))
    raw = _compiled.get(key)
    if raw is None:
        kernel[grid, block, _external_stream(stream.ptr)](*args)
        compiled = kernel.overloads[tuple(kernel.typeof_pyval(a) for a in args)]
        _compiled[key] = _RawKernel(compiled) if RAW_LAUNCH else _NumbaKernel(compiled)
        return
    raw(_dim3(grid), _dim3(block), args, stream)


class _NumbaKernel:
    """Numba's own launch of a compiled kernel (the RAW_LAUNCH=0 path)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, grid, block, args, stream) -> None:
        self.compiled.launch(args, grid, block, _external_stream(stream.ptr), 0)


class _RawKernel:
    """A Numba-compiled kernel loaded as a CuPy function. Array arguments are passed as Numba
    lays them out: meminfo, parent, size, itemsize, data pointer, shape..., strides (bytes)."""

    def __init__(self, compiled):
        import cupy
        cc = cuda.get_current_device().compute_capability
        self.module = cupy.cuda.function.Module()
        cubin = compiled._codelibrary.get_cubin(cc=cc)
        self.module.load(bytes(getattr(cubin, "code", cubin)))  # cuda.core ObjectCode or bytes
        self.function = self.module.get_function(compiled.entry_name)

    def __call__(self, grid, block, args, stream) -> None:
        params = []
        for a in args:
            if isinstance(a, (int, np.integer)):
                params.append(np.int64(a))
            elif isinstance(a, (float, np.floating)):
                params.append(np.float32(a))
            else:
                params.extend(_array_params(a))
        self.function(grid, block, tuple(params), stream=stream)


def _array_params(a) -> tuple:
    params = getattr(a, "_pagemem_params", None)
    if params is None:
        ptr = a.device_ctypes_pointer.value or 0
        params = (np.intp(0), np.intp(0), np.intp(a.size), np.intp(a.dtype.itemsize), np.uintp(ptr),
                  *map(np.intp, a.shape), *map(np.intp, a.strides))
        a._pagemem_params = params
    return params


def _arg_key(a):
    flags = getattr(a, "flags", None)
    if flags is None:
        return type(a)
    return a.dtype, a.ndim, flags["C_CONTIGUOUS"], flags["F_CONTIGUOUS"]


def _dim3(x) -> tuple[int, int, int]:
    x = (x,) if isinstance(x, int) else tuple(x)
    return x + (1,) * (3 - len(x))
