"""Paged decode's launch rules (split-K partitioning, block sizes, grid order) and its one-shot
CUDA launcher; the plan that applies them lives in kernels/decode_plan.py."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pagemem.kernels._checks import AttnDims
from pagemem.kernels._device import dtype_kind

THREADS = 128
# Split-K launches (few sequences, long contexts) use 256 threads: H100, bench_attention.py,
# 2026-11-26 15:41 UTC, head_dim 128: 8x8192 162.9 vs 184.6 us, 1x32768 110.5 vs 132.2 us; without
# a split 128 stays (256x512: 251.4 vs 280.2 us; 64x2048 244.2 vs 238.7, within noise).
THREADS_SPLIT = 256
MIN_SPLIT_SPAN = 512       # contexts up to this many tokens never split
MIN_PART_TOKENS = 256      # smallest partition worth a block
# Grid order: a sequence's KV heads in neighbouring blocks (see the kernel's docstring). H100,
# 2026-11-26, head_dim 64: 3% less time at 256x512, 2 to 4% at 8x8192 (split); head_dim 128: 8% at
# 8x8192, neutral at 64x2048 and 256x512. grid.y holds at most 65535 sequences; beyond, seq-major.
HEADS_MAJOR = True
MAX_GRID_Y = 65535


def split_rule(num_blocks: int, span: int, page_size: int, sms: int,
               resident: int = 2) -> tuple[int, int]:
    """(num_partitions, partition_tokens) for a grid of ``num_blocks`` (seq, kv-head) blocks over
    contexts of at most ``span`` tokens, ``resident`` blocks fitting on an SM at once.

    No split while the grid gives every SM two blocks or more, or the span is short: a block
    streams its tokens at full rate on its own. Otherwise partitions are added while the grid
    still fits every SM once (one wave: H100, 2026-11-26, 8x8192 at head_dim 128 took 131 us with
    256 blocks against 165 us with 576, two waves), none shorter than 256 tokens, each a whole
    number of pages.
    """
    if num_blocks >= 2 * sms or span <= MIN_SPLIT_SPAN:
        return 1, span
    parts = max(1, min(resident * sms // num_blocks, -(-span // MIN_PART_TOKENS)))
    part_tokens = -(-span // parts)
    part_tokens = -(-part_tokens // page_size) * page_size
    return -(-span // part_tokens), part_tokens


# One-shot calls reuse the plan of an earlier call on the same batch arrays (a plan reads their
# shapes, never their values on the device, and holds them, so their memory cannot be reused for
# another array while it is cached).
MAX_CACHED_PLANS = 32
_plans: OrderedDict = OrderedDict()


def paged_decode_cuda(q, k_cache, v_cache, page_tables, context_lens, scale: float, out, stream,
                      window: int, dims: AttnDims, **tuning):
    """Enqueue decode attention (arguments checked by the caller): a one-shot DecodePlan, run
    once (a cached one for a batch seen before). Tuning overrides (tests and bench): kernel
    ("tc" | "simt"), num_partitions (replaces the split rule), threads (a multiple of 32), lanes,
    tokens_per_group, max_registers (None: uncapped), heads_major; with any, a fresh plan."""
    from pagemem.kernels.decode_plan import DecodePlan
    out_kind = dtype_kind(out.dtype, "out")
    if tuning or isinstance(q, np.ndarray):
        plan = DecodePlan(dims, k_cache, page_tables, context_lens, scale, window, out_kind, stream, tuning,
                          kernel_path=True)
        return plan.run(q, k_cache, v_cache, out)
    key = (_key(page_tables), _key(context_lens), k_cache.shape, k_cache.strides, k_cache.dtype, dims,
           out_kind, float(scale), window, None if stream is None else stream.ptr)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = DecodePlan(dims, k_cache, page_tables, context_lens, scale, window, out_kind, stream,
                                        {}, kernel_path=True)
        if len(_plans) > MAX_CACHED_PLANS:
            _plans.popitem(last=False)
    return plan.run(q, k_cache, v_cache, out)


def _key(x) -> tuple:
    return x.data.ptr, x.shape, x.strides, x.dtype
