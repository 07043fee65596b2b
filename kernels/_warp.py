"""Warp-level operations for the tensor-core kernels, each with a simulator twin.

On the device they are single PTX instructions, emitted as inline assembly from Numba (no C++):

- ``mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scr, tid)``: ``mma.sync.aligned.m16n8k16.row.col``
  with fp16 or bf16 operands (``make_mma(kind)``) and float32 accumulators; returns (d0, d1, d2, d3).
  With ``grp = lane >> 2`` and ``tig = lane & 3``, a lane holds (PTX ISA, "Matrix fragments for
  mma.m16n8k16"), two 16-bit values a register, the lower column in the low half:
  a0 = A[grp][2tig : 2tig+2], a1 = A[grp+8][2tig : 2tig+2], a2 = A[grp][2tig+8 : 2tig+10],
  a3 = A[grp+8][2tig+8 : 2tig+10]; b0 = B[2tig : 2tig+2][grp], b1 = B[2tig+8 : 2tig+10][grp];
  c0, c1 = C[grp][2tig], C[grp][2tig+1]; c2, c3 = C[grp+8][2tig], C[grp+8][2tig+1].
- ``shfl_xor(v, mask, scr, tid)`` and ``shfl_idx(v, src_lane, scr, tid)``: float32 shuffles.
- ``pack2(lo, hi)``: two float32 rounded to one register of fp16 or bf16 (``make_pack2(kind)``).
- ``exp2(x)``: ``ex2.approx.ftz.f32`` (2^-inf = 0).

The simulator has no warps: its twins exchange values through the shared scratch ``scr`` (one
slot per thread, ``SCRATCH_WORDS`` uint32 words each; size 1 on the device, where it is unused)
between two barriers, so callers must reach them in block-uniform control flow. The mma twin
carries out the fragment layout above literally, so the simulator tests check a kernel's use of
the layout, not just its arithmetic.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, types

from pagemem.kernels._device import BF16, F16, FULL_MASK, SIM

SCRATCH_WORDS = 6      # uint32 words a thread places in the scratch for one mma (a0..a3, b0, b1)

if SIM:
    def _halves(words: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) 16-bit values of uint32 words, as float64."""
        w = words.astype(np.uint32)
        lo, hi = (w & 0xFFFF).astype(np.uint16), (w >> 16).astype(np.uint16)
        if kind == F16:
            return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
        return ((lo.astype(np.uint32) << 16).view(np.float32).astype(np.float64),
                (hi.astype(np.uint32) << 16).view(np.float32).astype(np.float64))

    def _warp_matrices(regs: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
        """A [16, 16] and B [16, 8] from a warp's registers regs [32, 6] (a0..a3, b0, b1)."""
        a, b = np.zeros((16, 16)), np.zeros((16, 8))
        for lane in range(32):
            grp, tig = lane >> 2, lane & 3
            for r, (row, col) in enumerate(((grp, 2 * tig), (grp + 8, 2 * tig), (grp, 2 * tig + 8),
                                            (grp + 8, 2 * tig + 8))):
                lo, hi = _halves(regs[lane, r:r + 1], kind)
                a[row, col], a[row, col + 1] = lo[0], hi[0]
            for r, k in enumerate((2 * tig, 2 * tig + 8)):
                lo, hi = _halves(regs[lane, 4 + r:5 + r], kind)
                b[k, grp], b[k + 1, grp] = lo[0], hi[0]
        return a, b

    def make_mma(kind: int):
        @cuda.jit(device=True)
        def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scr, tid):
            base = tid * SCRATCH_WORDS
            for i, x in enumerate((a0, a1, a2, a3, b0, b1)):
                scr[base + i] = x
            cuda.syncthreads()   # the warp's fragments are in place
            w0 = (tid & ~31) * SCRATCH_WORDS
            regs = np.array(scr[w0:w0 + 32 * SCRATCH_WORDS]).reshape(32, SCRATCH_WORDS)
            a, b = _warp_matrices(regs, kind)
            cuda.syncthreads()   # every lane has read before the scratch is reused
            lane = tid & 31
            grp, tig = lane >> 2, lane & 3
            d = a @ b
            return (np.float32(c0 + d[grp, 2 * tig]), np.float32(c1 + d[grp, 2 * tig + 1]),
                    np.float32(c2 + d[grp + 8, 2 * tig]), np.float32(c3 + d[grp + 8, 2 * tig + 1]))
        return mma

    @cuda.jit(device=True)
    def _exchange(v, src, scr, tid):
        scr[tid * SCRATCH_WORDS] = np.float32(v).view(np.uint32)
        cuda.syncthreads()   # every lane's value is in place
        r = np.uint32(scr[((tid & ~31) + src) * SCRATCH_WORDS]).view(np.float32)
        cuda.syncthreads()   # every lane has read
        return r

    def shfl_xor(v, mask, scr, tid):
        return _exchange(v, (tid & 31) ^ mask, scr, tid)

    def shfl_idx(v, src, scr, tid):
        return _exchange(v, src & 31, scr, tid)

    def make_pack2(kind: int):
        def pack2(lo, hi):
            if kind == F16:
                bits = [int(np.float16(x).view(np.uint16)) for x in (lo, hi)]
            else:
                bits = [_bf16_bits(np.float32(x)) for x in (lo, hi)]
            return np.uint32(bits[0] | (bits[1] << 16))
        return pack2

    def _bf16_bits(x: np.float32) -> int:
        if x != x:
            return 0x7FC0
        u = int(x.view(np.uint32))
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16 & 0xFFFF

    def exp2(x):
        return np.float32(2.0 ** float(x)) if x != -math.inf else np.float32(0)

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    _I32, _F32 = ir.IntType(32), ir.FloatType()

    def _make_mma_intrinsic(elem: str):
        @intrinsic
        def mma_intrinsic(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4)
                asm = ir.InlineAsm(fnty, f"mma.sync.aligned.m16n8k16.row.col.f32.{elem}.{elem}.f32 "
                                   "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
                                   "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
                ret = builder.call(asm, list(args))
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, i) for i in range(4)])
            return sig, codegen
        return mma_intrinsic

    def _make_pack_intrinsic(elem: str):
        @intrinsic
        def pack_intrinsic(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                asm = ir.InlineAsm(ir.FunctionType(_I32, [_F32, _F32]), f"cvt.rn.{elem}x2.f32 $0, $1, $2;", "=r,f,f")
                return builder.call(asm, [args[1], args[0]])   # the first source fills the high half
            return sig, codegen
        return pack_intrinsic

    @intrinsic
    def exp2(typingctx, x):
        sig = types.float32(types.float32)

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(_F32, [_F32]), "ex2.approx.ftz.f32 $0, $1;", "=f,f")
            return builder.call(asm, list(args))
        return sig, codegen

    _ELEM = {F16: "f16", BF16: "bf16"}

    @functools.cache
    def make_mma(kind: int):
        op = _make_mma_intrinsic(_ELEM[kind])

        @cuda.jit(device=True, forceinline=True)
        def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scr, tid):
            return op(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
        return mma

    @functools.cache
    def make_pack2(kind: int):
        return _make_pack_intrinsic(_ELEM[kind])

    @cuda.jit(device=True, forceinline=True)
    def shfl_xor(v, mask, scr, tid):
        return cuda.shfl_xor_sync(FULL_MASK, v, mask)

    @cuda.jit(device=True, forceinline=True)
    def shfl_idx(v, src, scr, tid):
        return cuda.shfl_sync(FULL_MASK, v, src)


def scratch_words(threads: int) -> int:
    """Size of the shared uint32 scratch a kernel of ``threads`` threads passes to these ops."""
    return threads * SCRATCH_WORDS if SIM else 1
