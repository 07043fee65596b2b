"""Fused per-token kernels of a Llama-style layer: RMSNorm (with the residual add), RoPE, SwiGLU.

Written out in CuPy, each of these is a chain of five to ten elementwise kernels over the
hidden states (casts, squares, a mean, a divide, slices, a concatenate); a decode step of a
16-layer model launched about fifty of them per layer. Here each is one kernel that reads its
inputs once and writes its outputs once, in float32 registers.

Rounding follows the NumPy-style forward (and HF): a 16-bit value is rounded where the
unfused code stores an intermediate in the model dtype (``rnd`` below), never in between.
Arrays are viewed as raw bits (``uint16`` for fp16/bf16), as in the attention kernels.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32

from pagemem.kernels._arrays import as_device, launch
from pagemem.kernels._device import SIM, bits_dtype, load_scalar, make_block_reduce, store_scalar

NORM_THREADS = 256
POINT_THREADS = 128
MAX_GRID_Y = 65535


def _rounder(kind: int):
    load, store = load_scalar[kind], store_scalar[kind]

    def rnd(x):
        return load(store(x))
    return rnd if SIM else cuda.jit(device=True)(rnd)


@functools.cache
def make_rms_norm_kernel(hidden: int, kind: int, threads: int, add: bool):
    """out[t] = rnd(rnd(r[t] / sqrt(mean(r[t]^2) + eps)) * weight), r = x (or, with ``add``,
    residual[t] = rnd(residual[t] + x[t]) written back in place). Launch: grid=num_tokens,
    block=threads; a row's values stay in registers between the two passes."""
    H, NT = hidden, threads
    VPT = -(-H // NT)
    load, store, rnd = load_scalar[kind], store_scalar[kind], _rounder(kind)
    block_sum = make_block_reduce(NT, False)
    INV_H = float32(1.0 / H)

    @cuda.jit
    def rms_norm_kernel(out, x, residual, weight, eps):
        # out, x, residual: [T, H] bits; weight: [H] bits; eps float32
        t, tid = cuda.blockIdx.x, cuda.threadIdx.x
        sm = cuda.shared.array(NT, float32)
        vals = cuda.local.array(VPT, float32)
        ss = float32(0)
        for k in range(VPT):
            i = tid + k * NT
            val = float32(0)
            if i < H:
                val = load(x[t, i])
                if add:
                    val = rnd(val + load(residual[t, i]))
                    residual[t, i] = store(val)
            vals[k] = val
            ss += val * val
        inv = float32(1) / math.sqrt(block_sum(ss, sm, tid) * INV_H + eps)
        for k in range(VPT):
            i = tid + k * NT
            if i < H:
                out[t, i] = store(load(weight[i]) * rnd(vals[k] * inv))

    return rms_norm_kernel


@functools.cache
def make_rope_kernel(head_dim: int, kind: int):
    """Rotate-half RoPE in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) with c, s = cos, sin of
    position * inv_freq[i], rounded to the dtype as the unfused forward does. Launch:
    grid=(ceil(num_heads * head_dim / 2 / threads), min(T, 65535)), grid-stride over tokens."""
    HALF = head_dim // 2
    load, store, rnd = load_scalar[kind], store_scalar[kind], _rounder(kind)

    @cuda.jit
    def rope_kernel(x, positions, inv_freq):
        # x: [T, heads, head_dim] bits (rows may be strided); positions: [T] ints; inv_freq: [HALF] f32
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        h, i = e // HALF, e % HALF           # HALF is a constant: no run-time division
        if h >= x.shape[1]:
            return
        f = inv_freq[i]
        for t in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):
            ang = float32(positions[t]) * f
            c, s = rnd(math.cos(ang)), rnd(math.sin(ang))
            x1, x2 = load(x[t, h, i]), load(x[t, h, i + HALF])
            x[t, h, i] = store(rnd(x1 * c) - rnd(x2 * s))
            x[t, h, i + HALF] = store(rnd(x2 * c) + rnd(x1 * s))

    return rope_kernel


@functools.cache
def make_silu_mul_kernel(kind: int):
    """out[t, i] = rnd(silu(g)) * u with g, u = gate_up[t, i], gate_up[t, I + i] (SwiGLU; silu
    in float32 and rounded once, as torch does). Launch: grid=(ceil(I / threads), min(T, 65535))."""
    load, store, rnd = load_scalar[kind], store_scalar[kind], _rounder(kind)

    @cuda.jit
    def silu_mul_kernel(out, gate_up):
        # out: [T, I] bits; gate_up: [T, 2 * I] bits
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        inter = out.shape[1]
        if i >= inter:
            return
        for t in range(cuda.blockIdx.y, out.shape[0], cuda.gridDim.y):
            g = load(gate_up[t, i])
            s = rnd(g / (float32(1) + math.exp(-g)))
            out[t, i] = store(s * load(gate_up[t, inter + i]))

    return silu_mul_kernel


# ---- launchers (arguments already checked by kernels/__init__.py) -----------------------------
def rms_norm_cuda(x, weight, eps: float, residual, out, kind: int, stream, threads: int = NORM_THREADS):
    if x.shape[0] == 0:
        return out
    bits = bits_dtype(kind)
    kernel = make_rms_norm_kernel(x.shape[1], kind, threads, residual is not None)
    res = as_device(residual if residual is not None else x, bits)
    launch(kernel, x.shape[0], threads, stream, as_device(out, bits), as_device(x, bits), res,
           as_device(weight, bits), float32(eps))
    return out


def rope_cuda(x, positions, inv_freq, kind: int, stream, threads: int = POINT_THREADS) -> None:
    T, heads, d = x.shape
    if T == 0:
        return
    grid = (-(-heads * (d // 2) // threads), min(T, MAX_GRID_Y))
    launch(make_rope_kernel(d, kind), grid, threads, stream, as_device(x, bits_dtype(kind)),
           as_device(positions), as_device(inv_freq))


def silu_mul_cuda(gate_up, out, kind: int, stream, threads: int = POINT_THREADS):
    T, inter = out.shape
    if T:
        bits = bits_dtype(kind)
        grid = (-(-inter // threads), min(T, MAX_GRID_Y))
        launch(make_silu_mul_kernel(kind), grid, threads, stream, as_device(out, bits), as_device(gate_up, bits))
    return out
