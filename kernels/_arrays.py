"""Arrays, streams and launches for the CUDA launchers.

- ``as_device(x, dtype)``: a CuPy array as a Numba device array (optionally reinterpreted as
  another dtype along its last axis) without a stream sync; NumPy arrays are wrapped in place
  for the simulator.
- ``as_flat_words(cache)``: a cache as one flat uint64 array plus its strides in words.
- ``launch(kernel, grid, block, stream, *args)``: Numba's first launch, CuPy relaunches after.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
from numba import cuda

from pagemem.kernels._device import SIM

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


def compiled_launcher(kernel, args):
    """The CuPy launcher ``launch`` made for ``kernel`` with these argument types (after a first
    launch), or None (the simulator, PAGEMEM_RAW_LAUNCH=0, or not launched yet)."""
    if SIM:
        return None
    raw = _compiled.get((kernel, *map(_arg_key, args)))
    return raw if isinstance(raw, _RawKernel) else None


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
        self.function(grid, block, tuple(self.params_and_pointers(args)[0]), stream=stream)

    @staticmethod
    def params_and_pointers(args) -> tuple[list, list]:
        """(the flattened kernel parameters, for each argument the index of its data pointer in
        them, or None for a scalar): a caller may then swap pointers and launch again."""
        params, at = [], []
        for a in args:
            if isinstance(a, (int, np.integer)):
                at.append(None)
                params.append(np.int64(a))
            elif isinstance(a, (float, np.floating)):
                at.append(None)
                params.append(np.float32(a))
            else:
                at.append(len(params) + 4)          # meminfo, parent, size, itemsize, data, ...
                params.extend(_array_params(a))
        return params, at


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


class PackedLaunch:
    """One kernel's launch with its parameters packed once, for relaunching with a few pointers
    changed: ``set(i, value)`` rewrites parameter slot ``i`` (8 bytes each, as Numba flattens
    arrays and int64s; a float32 sits in a slot's low half), and ``launch(stream_ptr)`` is one
    ``cuLaunchKernel`` through ctypes with the packed ``void*`` array: a few microseconds of host
    time, where CuPy's call marshals Numba's ~80 flattened parameters again on every launch. The
    driver copies the values at the launch, so they may be rewritten right after."""

    def __init__(self, raw: "_RawKernel", args, grid, block) -> None:
        params, self.pointer_at = raw.params_and_pointers(args)
        self._vals = np.zeros(len(params), np.int64)
        for i, p in enumerate(params):
            if isinstance(p, np.float32):
                self._vals[i:i + 1].view(np.float32)[0] = p
            else:
                self._vals[i] = np.int64(np.uint64(p)) if isinstance(p, np.uint64) else int(p)
        base = self._vals.ctypes.data
        self._ptrs = (ctypes.c_void_p * len(params))(*(base + 8 * i for i in range(len(params))))
        self._raw = raw              # keeps the module (and so the function) loaded
        # cuLaunchKernel's leading arguments as ctypes values made once (no conversion per call)
        self._head = (ctypes.c_void_p(raw.function.ptr), *(ctypes.c_uint(v) for v in (*_dim3(grid), *_dim3(block))),
                      ctypes.c_uint(0))
        self._launch = _driver_launch()

    def set(self, i: int, value: int) -> None:
        self._vals[i] = value

    def launch(self, stream_ptr: int) -> None:
        rc = self._launch(*self._head, stream_ptr, self._ptrs, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {rc}")


@functools.cache
def _driver_launch():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernel
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    fn.restype = ctypes.c_int
    return fn
