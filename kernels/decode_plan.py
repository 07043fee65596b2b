"""Plan once per step, run once per layer: paged decode for runtimes that call it layer by layer
(the split of FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper.plan`` / ``run``).

``plan_decode`` does the work that is the same for every layer of a step: it checks the batch
(page tables, context lengths, head counts, dtypes, window), picks the kernel, the split-K
partitioning and the launch configuration, allocates the partial-output scratch, and converts
the batch's arrays for the kernel once. ``DecodePlan.run(q, k_cache, v_cache, out)`` then checks
only that the per-layer arrays have the planned shapes, dtypes and strides, and launches: after
its first call, through parameters packed once (``_arrays.PackedLaunch``) in which only the four
per-layer pointers change, one ``cuLaunchKernel`` (no Numba dispatch, no per-call marshalling).

The kernel: the tensor-core one (kernels/decode_tc.py) for 16-bit caches it serves, with the
warps a block and the split-K partitions of ``tc_launch``; the CUDA-core one
(kernels/paged_attention.py) otherwise, or when asked (``kernel="simt"``).

Every layer's cache view of a page-major pool (``PagePool.layer_kv``) has the same shape and
strides, so one plan serves all layers. A plan holds its batch arrays: keep them unchanged while
the plan is used.
"""
from __future__ import annotations

import numpy as np
from numba import float32

from pagemem.kernels import _arrays, cpu as _cpu
from pagemem.kernels._arrays import as_device, as_flat_words, launch, num_sms
from pagemem.kernels._checks import AttnDims, check_attention, check_host_lens, check_same_device, check_window
from pagemem.kernels._device import KIND_DTYPES, bits_dtype, dtype_kind
from pagemem.kernels.decode import MIN_SPLIT_SPAN, THREADS, THREADS_SPLIT, split_rule
from pagemem.kernels.decode_tc import make_paged_decode_tc_kernel, tc_eligible, tc_warps
from pagemem.kernels.paged_attention import (MAX_REGISTERS, TOKENS_PER_GROUP, choose_lanes, heads_per_block,
                                             make_decode_reduce_kernel, make_paged_decode_kernel)

MAX_GRID_Y = 65535
TC_MAX_REGISTERS = None  # ptxas' own choice: no spills (108 / 165 / 233 registers at head_dim 64 / 128 / 256)
# Registers a thread of the tensor-core kernel holds, by 64-dim chunks of head_dim (ptxas for sm_90,
# rounded up to its allocation unit of 8), for the occupancy the launch rule assumes.
TC_REGISTERS = {1: 112, 2: 168, 3: 208, 4: 240}
MIN_ROUNDS = 8           # a warp streams at least this many 16-token tiles where the context allows
WARPS_AN_SM = 7.5        # warps an SM needs in flight to keep its share of HBM busy (one partial wave)
SCORE_SLACK = 0.12       # the wave model is coarse: more warps a block only for a clearly better score


def tc_launch(num_blocks: int, span: int, page_size: int, head_dim: int, sms: int, threads=None,
              num_partitions=None, max_registers=None) -> tuple[int, int, int]:
    """(warps a block, partitions, tokens a partition) of the tensor-core decode for a grid of
    ``num_blocks`` (sequence, head chunk) blocks over contexts of at most ``span`` tokens.

    Few blocks of long contexts (split_rule's case) split into partitions of 8-warp blocks that
    fill the SMs once. Otherwise the warps a block (2, 4 or 8; each warp at least MIN_ROUNDS
    tiles) score by their grid: one wave with WARPS_AN_SM warps an SM scores 1, several waves the
    share of their last wave's slots that work fills; the fewest warps within SCORE_SLACK of the
    best score win. H100, 2026-12-07 (bench/RESULTS.md, bench_attention --matrix --variants, 2, 4
    and 8 warps timed on 12 shapes): this picks the measured best, or a variant within 0.01x of
    it, on each of them.
    """
    regs = max_registers or TC_REGISTERS[min(4, -(-head_dim // 64))]

    def resident(warps: int) -> int:
        return max(1, min(65536 // (32 * warps * -(-regs // 8) * 8), 64 // warps))

    if num_partitions is None and threads is None and num_blocks < 2 * sms and span > MIN_SPLIT_SPAN:
        warps = tc_warps(head_dim, 8)
        parts, part_tokens = split_rule(num_blocks, span, page_size, sms, resident(warps))
        if parts > 1:
            return warps, parts, part_tokens
    if threads is not None:
        warps = tc_warps(head_dim, threads // 32)
    else:
        tiles = -(-span // 16)
        options = [w for w in (2, 4, 8) if tc_warps(head_dim, w) == w and -(-tiles // w) >= MIN_ROUNDS] or [2]

        def score(warps: int) -> float:
            waves = num_blocks / (resident(warps) * sms)
            if waves <= 1:
                return min(1.0, num_blocks * warps / sms / WARPS_AN_SM)
            return waves / -(-waves // 1)
        best = max(score(w) for w in options)
        warps = next(w for w in options if score(w) >= best - SCORE_SLACK)   # the fewest within the slack
    if num_partitions is None:
        parts, part_tokens = split_rule(num_blocks, span, page_size, sms, resident(warps))
    else:
        parts, part_tokens = num_partitions, -(-span // num_partitions)
    return warps, parts, part_tokens


def tensor_cores_serve(dims: AttnDims, k_cache) -> bool:
    """The tensor-core kernel serves this cache: 16-bit dtype, head_dim a multiple of 8 up to 256,
    pages of 8 tokens or more, and every row starting on a 16-byte boundary (even word strides,
    an aligned base)."""
    if not tc_eligible(dims.head_dim, dims.page_size, dims.cache_kind):
        return False
    return all(st % 16 == 0 for st in tuple(k_cache.strides)[:3]) and _pointer(k_cache) % 16 == 0


def _pointer(x) -> int:
    return x.__array_interface__["data"][0] if isinstance(x, np.ndarray) else x.data.ptr


class DecodePlan:
    """One step's decode attention, ready to run on each layer's (q, k_cache, v_cache).

    Attributes a caller may read: ``dims`` (AttnDims), ``kernel_name`` ("tc" or "simt"; None on
    the CPU path), ``num_partitions``, ``grid``, ``threads``.
    """

    def __init__(self, dims: AttnDims, k_cache, page_tables, context_lens, scale: float, window: int,
                 out_kind: int, stream, tuning: dict, kernel_path: bool | None = None) -> None:
        self.dims, self.scale, self.window, self.stream = dims, float(scale), window, stream
        self.on_gpu = not isinstance(page_tables, np.ndarray)
        # The CUDA kernel runs for CuPy arrays, and for NumPy ones under the simulator when asked
        # (``kernel_path=True``: the simulator tests); NumPy arrays otherwise take the CPU path.
        self.kernel_path = self.on_gpu if kernel_path is None else bool(kernel_path)
        self.page_tables, self.context_lens = page_tables, context_lens
        self.cache_shape, self.cache_strides = tuple(k_cache.shape), tuple(k_cache.strides)
        self.cache_dtype, self.out_kind = np.dtype(k_cache.dtype), out_kind
        self.q_shape = (dims.num_seqs, dims.num_q_heads, dims.head_dim)
        self._raw = self._reduce_raw = None
        self.kernel_name = None
        self._q_dtype, self._out_dtype = KIND_DTYPES[dims.q_kind], KIND_DTYPES[out_kind]
        self._array_type = type(page_tables)
        self._aligned16 = False
        if self.kernel_path:
            self._plan_launch(k_cache, tuning)

    # ---- planning ---------------------------------------------------------------------------------
    def _plan_launch(self, k_cache, tuning: dict) -> None:
        if self.on_gpu:
            import cupy as xp
        else:
            xp = np
        d = self.dims
        span = self.page_tables.shape[1] * d.page_size
        span = min(span, self.window) if self.window else span
        serves = tensor_cores_serve(d, k_cache)
        kind = tuning.get("kernel") or ("tc" if serves else "simt")
        if kind == "tc" and not serves:
            raise ValueError(f"kernel='tc': the tensor-core decode serves fp16/bf16 caches with head_dim a multiple "
                             f"of 8 up to 256, pages of 8 tokens or more and 16-byte aligned rows; got {d}")
        self.kernel_name = kind
        self._aligned16 = kind == "tc"
        heads = heads_per_block(d.group)          # both kernels serve up to 8 query heads a block
        num_blocks = d.num_seqs * d.num_kv_heads * (d.group // heads)
        heads_major = tuning.get("heads_major")
        heads_major = bool(d.num_seqs <= MAX_GRID_Y if heads_major is None else heads_major)
        params = (d.head_dim, d.page_size, d.group, heads, d.cache_kind, d.q_kind, self.out_kind)
        if kind == "tc":
            max_registers = tuning.get("max_registers", TC_MAX_REGISTERS)
            warps, parts, part_tokens = tc_launch(num_blocks, span, d.page_size, d.head_dim, num_sms(),
                                                  tuning.get("threads"), tuning.get("num_partitions"), max_registers)
            self.threads = 32 * warps
            self.kernel = make_paged_decode_tc_kernel(*params, parts > 1, warps, heads_major, max_registers)
        else:
            threads = tuning.get("threads")
            max_registers = tuning.get("max_registers", MAX_REGISTERS)
            if tuning.get("num_partitions") is None:
                resident = max(1, 65536 // ((threads or THREADS_SPLIT) * (max_registers or 255)))
                parts, part_tokens = split_rule(num_blocks, span, d.page_size, num_sms(), resident)
            else:
                parts = tuning["num_partitions"]
                part_tokens = -(-span // parts)
            self.threads = threads or (THREADS_SPLIT if parts > 1 else THREADS)
            lanes = tuning.get("lanes") or choose_lanes(d.head_dim, heads, d.cache_kind)
            self.kernel = make_paged_decode_kernel(*params, parts > 1, lanes, self.threads,
                                                   tuning.get("tokens_per_group", TOKENS_PER_GROUP), max_registers,
                                                   heads_major)
        self.num_partitions = parts
        head_blocks = d.num_kv_heads * (d.group // heads)
        self.grid = (head_blocks, d.num_seqs, parts) if heads_major else (d.num_seqs, head_blocks, parts)
        with self.stream if self.stream is not None and self.on_gpu else _null():
            if parts > 1:
                shape = (d.num_seqs, d.num_q_heads, parts)
                self.part_out = xp.empty((*shape, d.head_dim), np.float32)
                self.part_ml = xp.empty((*shape, 2), np.float32)
            else:
                self.part_out = self.part_ml = xp.zeros((1, 1, 1, 2), np.float32)
        self.reduce = make_decode_reduce_kernel(d.head_dim, self.out_kind) if parts > 1 else None
        self._fixed = (as_device(self.part_out), as_device(self.part_ml))
        self._batch = (as_device(self.page_tables), as_device(self.context_lens), float32(self.scale), self.window,
                       part_tokens)
        self._strides = as_flat_words(k_cache)[1]

    # ---- running ----------------------------------------------------------------------------------
    def run(self, q, k_cache, v_cache, out=None):
        """Attention of each sequence's new token (q [num_seqs, num_q_heads, head_dim]) over this
        layer's cache; writes ``out`` (default: a new array of q's dtype) and returns it. Enqueued
        on the plan's stream; nothing waits."""
        if not self._matches(q, k_cache, v_cache, out):
            self._check(q, k_cache, v_cache, out)
        if out is None:
            out = _empty(q.shape, q.dtype, self.on_gpu)
        if not self.kernel_path:
            return _cpu.paged_decode_cpu(q, k_cache, v_cache, self.page_tables, self.context_lens, self.scale,
                                         out, self.window, self.dims)
        if self._raw is None or (q.strides, out.strides) != self._layer_strides:
            self._check_aligned(_pointer(k_cache), _pointer(v_cache))
            self._first_launch(q, k_cache, v_cache, out)
            return out
        main, (o_at, q_at, k_at, v_at) = self._raw
        k_ptr, v_ptr, o_ptr = k_cache.data.ptr, v_cache.data.ptr, out.data.ptr
        self._check_aligned(k_ptr, v_ptr)
        main.set(o_at, o_ptr)
        main.set(q_at, q.data.ptr)
        main.set(k_at, k_ptr)
        main.set(v_at, v_ptr)
        stream = self.stream.ptr if self.stream is not None else _current_stream_ptr()
        main.launch(stream)
        if self._reduce_raw is not None:
            reduce, r_at = self._reduce_raw
            reduce.set(r_at, o_ptr)
            reduce.launch(stream)
        return out

    def _matches(self, q, k_cache, v_cache, out) -> bool:
        """The per-layer arrays have the planned shapes, dtypes, strides and array type: the fast
        test run() makes on every call (dtypes by identity; _check decides when it fails)."""
        return (type(q) is self._array_type and q.shape == self.q_shape and q.dtype is self._q_dtype
                and type(k_cache) is self._array_type and k_cache.shape == self.cache_shape
                and k_cache.strides == self.cache_strides and k_cache.dtype is self.cache_dtype
                and type(v_cache) is self._array_type and v_cache.shape == self.cache_shape
                and v_cache.strides == self.cache_strides and v_cache.dtype is self.cache_dtype
                and (out is None or (type(out) is self._array_type and out.shape == self.q_shape
                                     and out.dtype is self._out_dtype)))

    def _check_aligned(self, k_ptr: int, v_ptr: int) -> None:
        if self._aligned16 and (k_ptr | v_ptr) & 15:
            raise ValueError("k_cache, v_cache: the planned tensor-core kernel reads 16-byte runs; these caches "
                             "do not start on a 16-byte boundary")

    def _check(self, q, k_cache, v_cache, out) -> None:
        """The per-layer arrays match the plan (raises naming the argument that does not)."""
        if tuple(q.shape) != self.q_shape or (out is not None and tuple(out.shape) != self.q_shape):
            raise ValueError(f"q, out: expected shape {self.q_shape} (the plan's), got {tuple(q.shape)}"
                             + ("" if out is None else f" and {tuple(out.shape)}"))
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if tuple(c.shape) != self.cache_shape or tuple(c.strides) != self.cache_strides or c.dtype != self.cache_dtype:
                raise ValueError(f"{name}: expected the planned cache {self.cache_shape} {self.cache_dtype} with "
                                 f"strides {self.cache_strides}, got {tuple(c.shape)} {c.dtype} {tuple(c.strides)}")
        if dtype_kind(q.dtype, "q") != self.dims.q_kind or (out is not None and dtype_kind(out.dtype, "out") != self.out_kind):
            raise TypeError(f"q, out: dtypes differ from the plan's (q {q.dtype}"
                            + ("" if out is None else f", out {out.dtype}") + ")")
        for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
            if a is not None and isinstance(a, np.ndarray) == self.on_gpu:
                raise TypeError(f"{name}: the plan was made for " + ("CuPy" if self.on_gpu else "NumPy") + " arrays")

    def _args(self, q, k_cache, v_cache, out) -> tuple:
        (k_flat, _), (v_flat, _) = as_flat_words(k_cache), as_flat_words(v_cache)
        return (as_device(out, bits_dtype(self.out_kind)), *self._fixed, as_device(q, bits_dtype(self.dims.q_kind)),
                k_flat, v_flat, *self._batch, *self._strides)

    def _first_launch(self, q, k_cache, v_cache, out) -> None:
        """Launch through the generic path (compiling if needed), then pack the compiled kernel's
        parameters once (PackedLaunch), noting where each per-layer pointer sits among them."""
        args = self._args(q, k_cache, v_cache, out)
        self._layer_strides = (q.strides, out.strides)       # the packed parameters hold them
        launch(self.kernel, self.grid, self.threads, self.stream, *args)
        rargs = (args[0], *self._fixed, self.num_partitions)
        if self.reduce is not None:
            launch(self.reduce, self.dims[:2], self.dims.head_dim, self.stream, *rargs)
        raw = _arrays.compiled_launcher(self.kernel, args)
        if raw is None:          # the simulator, or launches through Numba: keep the generic path
            return
        main = _arrays.PackedLaunch(raw, args, self.grid, self.threads)
        at = main.pointer_at
        self._reduce_raw = None
        if self.reduce is not None:
            rraw = _arrays.compiled_launcher(self.reduce, rargs)
            if rraw is None:
                return
            reduce = _arrays.PackedLaunch(rraw, rargs, tuple(self.dims[:2]), self.dims.head_dim)
            self._reduce_raw = (reduce, reduce.pointer_at[0])
        self._raw = (main, (at[0], at[3], at[4], at[5]))      # out, q, k_flat, v_flat


def _current_stream_ptr() -> int:
    import cupy
    return cupy.cuda.get_current_stream().ptr


def plan_decode(page_tables, context_lens, num_q_heads: int, k_cache, *, q_dtype=None, out_dtype=None,
                scale=None, sliding_window=None, host_context_lens=None, stream=None, kernel_path=None,
                **tuning) -> DecodePlan:
    """A DecodePlan for the batch ``page_tables`` [num_seqs, max_pages] int32 and
    ``context_lens`` [num_seqs] int32 (kept by the plan), ``num_q_heads`` query heads, and caches
    shaped, typed and strided like ``k_cache`` (any layer's view). ``q_dtype`` and ``out_dtype``
    default to the cache's. ``host_context_lens`` (NumPy; optional on the GPU, where the device
    values cannot be read without a sync) is checked against the page tables; on the CPU the
    context lengths are checked directly. ``tuning``: kernel overrides for tests and benchmarks
    (kernel "tc" | "simt", num_partitions, threads, lanes, tokens_per_group, max_registers, heads_major);
    ``kernel_path=True`` runs the CUDA kernel on NumPy arrays under the simulator."""
    check_same_device(page_tables=page_tables, context_lens=context_lens, k_cache=k_cache)
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, (int, np.integer)) or num_q_heads < 1:
        raise ValueError(f"num_q_heads must be an int >= 1, got {num_q_heads!r}")
    num_seqs = page_tables.shape[0] if page_tables.ndim == 2 else -1
    q_dtype = np.dtype(k_cache.dtype if q_dtype is None else q_dtype)
    probe = _Shape((max(num_seqs, 0), int(num_q_heads), k_cache.shape[3] if k_cache.ndim == 4 else 0), q_dtype)
    dims = check_attention(probe, k_cache, k_cache, page_tables, context_lens, None, num_seqs)
    out_kind = dtype_kind(q_dtype if out_dtype is None else out_dtype, "out_dtype")
    window = check_window(sliding_window)
    scale = float(1.0 / np.sqrt(dims.head_dim)) if scale is None else float(scale)
    host = context_lens if isinstance(context_lens, np.ndarray) else host_context_lens
    if host is not None:
        check_host_lens(page_tables.shape, dims.page_size, host)
    return DecodePlan(dims, k_cache, page_tables, context_lens, scale, window, out_kind, stream, tuning, kernel_path)


class _Shape:
    """Stands for q in the shared attention checks: only its shape and dtype are read."""

    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _empty(shape, dtype, on_gpu: bool):
    if not on_gpu:
        return np.empty(shape, dtype)
    import cupy
    return cupy.empty(shape, dtype)
