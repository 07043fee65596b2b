"""kernels: paged attention and the fused per-token ops of a layer, as functions over arrays and a
stream. They write only their outputs and the arrays they name as written: the cache (store_kv),
``out``, ``residual`` (rms_norm) and ``x`` (apply_rope, in place).

NumPy arrays run the vectorized CPU path (kernels/cpu.py); CuPy arrays run Numba CUDA kernels
enqueued on ``stream`` (a CuPy stream; default CuPy's current stream) without synchronizing.
``pagemem.kernels.reference`` holds the NumPy oracles that specify every kernel.

    store_kv        k, v [num_tokens, num_kv_heads, head_dim] -> their slots of the cache
    paged_decode    q [num_seqs, num_q_heads, head_dim], one new token per sequence
    plan_decode     the same, planned once per step and run once per layer (DecodePlan.run)
    paged_prefill   q [num_tokens, num_q_heads, head_dim], ragged new tokens (query_start_loc)
    rms_norm        x [num_tokens, hidden] (optionally added into a residual first), one kernel
    apply_rope      x [num_tokens, heads, head_dim] rotated in place by each token's position
    silu_mul        gate_up [num_tokens, 2 * inter] -> silu(gate) * up [num_tokens, inter]
    sample          logits [num_rows, vocab] -> one token id per row (greedy, temperature, top-k,
                    top-p, min-p; counter-based seeds), no sort of the vocabulary on the GPU
    sample_logprobs log-probabilities of chosen tokens and of each row's most likely ones

On the GPU, paged_prefill runs one fused tensor-core kernel (CUDA C++ through CuPy's NVRTC:
kernels/prefill_flash.py) for fp16/bf16 caches with head_dim up to 128, and a gather + cuBLAS
route otherwise; ``prefill_is_fused`` tells which.

Caches are the per-layer views ``[num_pages, page_size, num_kv_heads, head_dim]`` (fp16, bf16 or
fp32; strided over pages is fine), page_tables ``[num_seqs, max_pages]`` int32 padded with
NULL_PAGE (0), context_lens ``[num_seqs]`` int32 >= 1 counting the new tokens. Math is float32.
"""
from __future__ import annotations

import numpy as np

from pagemem.kernels import cpu as _cpu
from pagemem.kernels._checks import check_attention, check_int_array, check_same_device, check_window, default_scale

from pagemem.kernels.reference_sampling import MAX_LOGPROBS, NUM_FIELDS
from pagemem.kernels.reference_sampling import pack_params as pack_sampling_params

__all__ = ["store_kv", "paged_decode", "plan_decode", "paged_prefill", "prefill_is_fused", "prefill_calls",
           "prefill_warmup_lengths", "rms_norm", "apply_rope", "silu_mul",
           "sample", "sample_logprobs", "pack_sampling_params", "NUM_FIELDS", "MAX_LOGPROBS"]


def store_kv(k, v, k_cache, v_cache, slot_mapping, stream=None) -> None:
    """Write new K/V into slots (``page_id * page_size + offset``). On the GPU, slots outside the
    pool or in NULL_PAGE are skipped; on the CPU they raise ValueError."""
    from pagemem.kernels.store_kv_kernel import check_store_kv
    on_gpu = check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    if not on_gpu:
        return _cpu.store_kv_cpu(k, v, k_cache, v_cache, slot_mapping)
    from pagemem.kernels.store_kv_kernel import store_kv_cuda
    store_kv_cuda(k, v, k_cache, v_cache, slot_mapping, stream)


def paged_decode(q, k_cache, v_cache, page_tables, context_lens, scale=None, out=None, stream=None,
                 sliding_window=None):
    """Attention of each sequence's one new query token over its cached tokens (the last of which
    is its own). Returns ``out`` [num_seqs, num_q_heads, head_dim] (default: q's dtype)."""
    on_gpu = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_tables=page_tables,
                               context_lens=context_lens, **({} if out is None else {"out": out}))
    dims = check_attention(q, k_cache, v_cache, page_tables, context_lens, out, q.shape[0] if q.ndim else 0)
    scale, window = default_scale(scale, dims.head_dim), check_window(sliding_window)
    out = _empty_like(q) if out is None else out
    if not on_gpu:
        return _cpu.paged_decode_cpu(q, k_cache, v_cache, page_tables, context_lens, scale, out, window, dims)
    from pagemem.kernels.decode import paged_decode_cuda
    return paged_decode_cuda(q, k_cache, v_cache, page_tables, context_lens, scale, out, stream, window, dims)


def plan_decode(page_tables, context_lens, num_q_heads, k_cache, **kwargs):
    """A DecodePlan: paged_decode's checks, partitioning and launch set-up done once for a step's
    batch; ``plan.run(q, k_cache, v_cache, out=None)`` per layer. See kernels/decode_plan.py."""
    from pagemem.kernels.decode_plan import plan_decode as _plan
    return _plan(page_tables, context_lens, num_q_heads, k_cache, **kwargs)


def paged_prefill(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale=None, out=None,
                  stream=None, sliding_window=None, max_query_len=None):
    """Ragged causal attention: the new tokens q[qsl[i]:qsl[i+1]] of sequence i are its last ones
    (already stored) and attend to its cached prefix and to each other causally. On the GPU,
    ``max_query_len`` (host int) sizes the padded blocks; without it the bound
    ``num_tokens - num_seqs + 1`` is used, which wastes work on ragged batches."""
    on_gpu = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, page_tables=page_tables,
                               context_lens=context_lens, query_start_loc=query_start_loc,
                               **({} if out is None else {"out": out}))
    num_seqs = context_lens.shape[0] if context_lens.ndim == 1 else -1
    dims = check_attention(q, k_cache, v_cache, page_tables, context_lens, out, num_seqs)
    check_int_array(query_start_loc, "query_start_loc", 1, num_seqs + 1)
    scale, window = default_scale(scale, dims.head_dim), check_window(sliding_window)
    out = _empty_like(q) if out is None else out
    if not on_gpu:
        return _cpu.paged_prefill_cpu(q, k_cache, v_cache, page_tables, context_lens, query_start_loc,
                                      scale, out, window, dims)
    if max_query_len is None:
        max_query_len = q.shape[0] - num_seqs + 1
    if not 1 <= max_query_len <= q.shape[0]:
        raise ValueError(f"max_query_len must be in 1..{q.shape[0]} (num_tokens), got {max_query_len}")
    from pagemem.kernels.prefill import paged_prefill_cuda
    return paged_prefill_cuda(q, k_cache, v_cache, page_tables, context_lens, query_start_loc, scale,
                              out, stream, window, dims, int(max_query_len))


def prefill_is_fused(k_cache) -> bool:
    """Whether paged_prefill over ``k_cache`` (q and out of its dtype) runs the fused kernel:
    CUDA arrays, fp16/bf16, a supported head_dim and device. Its cost follows each sequence's
    own tokens, so ragged batches need no grouping by length."""
    if isinstance(k_cache, np.ndarray):
        return False
    from pagemem.kernels.prefill_flash import config_supported
    return config_supported(k_cache.dtype, k_cache.shape[3], k_cache.device.id)


def prefill_calls(k_cache, query_lens, context_lens) -> list[tuple[int, int]]:
    """How to call paged_prefill on prompts of these new-token and context lengths (host ints,
    one per prompt, in batch order) over caches shaped like ``k_cache``: prompt ranges [a, b), one
    call each. One call where the fused kernel runs (its cost follows each sequence's own
    tokens); otherwise groups of similar lengths (``prefill.prefill_groups``), since the cuBLAS
    route pads every sequence of a call to its longest query and context."""
    if len(query_lens) <= 1 or prefill_is_fused(k_cache):
        return [(0, len(query_lens))]
    from pagemem.kernels.prefill import prefill_groups
    return prefill_groups(query_lens, context_lens, k_cache.shape[1])


def prefill_warmup_lengths(k_cache, limit: int) -> list[int]:
    """Prompt lengths, at most ``limit`` tokens, whose prefill (one prompt a call) compiles every
    kernel paged_prefill may run over caches like ``k_cache``, for an engine's start-up: one
    prompt for the fused kernel, else one per softmax variant of the cuBLAS route."""
    if prefill_is_fused(k_cache):
        return [max(1, min(64, limit))]
    from pagemem.kernels.prefill import prefill_key_classes
    return sorted({max(1, min(n, limit)) for n in prefill_key_classes(np.dtype(k_cache.dtype).itemsize)})


def rms_norm(x, weight, eps: float, residual=None, out=None, stream=None):
    """Per row of x [num_tokens, hidden]: x / sqrt(mean(x^2) + eps) * weight, statistics in float32.
    With ``residual`` (same shape and dtype) it first does ``residual += x`` in place and normalizes
    the sum: a pre-norm block's residual add and the next norm in one pass. Returns ``out``."""
    arrays = dict(x=x, weight=weight, **({} if residual is None else {"residual": residual}),
                  **({} if out is None else {"out": out}))
    on_gpu = check_same_device(**arrays)
    kind = _check_rows(x, "x", 2)
    for name, a in arrays.items():
        want = (x.shape[1],) if name == "weight" else tuple(x.shape)
        if tuple(a.shape) != want or a.dtype != x.dtype:
            raise ValueError(f"{name}: expected shape {want} and dtype {x.dtype}, got {tuple(a.shape)} {a.dtype}")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    out = _empty_like(x) if out is None else out
    if not on_gpu:
        return _cpu.rms_norm_cpu(x, weight, float(eps), residual, out)
    from pagemem.kernels.pointwise import rms_norm_cuda
    return rms_norm_cuda(x, weight, float(eps), residual, out, kind, stream)


def apply_rope(x, positions, inv_freq, stream=None) -> None:
    """Rotate-half RoPE in place (HF's pairing of i and i + head_dim/2). x [num_tokens, heads,
    head_dim] (rows may be strided, e.g. the q and k heads of a fused qkv projection);
    positions [num_tokens] ints; inv_freq [head_dim // 2] float32."""
    on_gpu = check_same_device(x=x, positions=positions, inv_freq=inv_freq)
    kind = _check_rows(x, "x", 3)
    if x.shape[2] % 2:
        raise ValueError(f"x: head_dim must be even, got {x.shape[2]}")
    if positions.ndim != 1 or positions.shape[0] != x.shape[0] or positions.dtype.kind not in "iu":
        raise ValueError(f"positions: expected [{x.shape[0]}] ints, got {tuple(positions.shape)} {positions.dtype}")
    if inv_freq.shape != (x.shape[2] // 2,) or inv_freq.dtype != "float32":
        raise ValueError(f"inv_freq: expected [{x.shape[2] // 2}] float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    if not on_gpu:
        return _cpu.rope_cpu(x, positions, inv_freq)
    from pagemem.kernels.pointwise import rope_cuda
    rope_cuda(x, positions, inv_freq, kind, stream)


def silu_mul(gate_up, out=None, stream=None):
    """SwiGLU's gate: gate_up [num_tokens, 2 * inter] -> silu(gate) * up [num_tokens, inter],
    silu in float32 rounded once to the dtype. Returns ``out``."""
    on_gpu = check_same_device(gate_up=gate_up, **({} if out is None else {"out": out}))
    kind = _check_rows(gate_up, "gate_up", 2)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up: width must be even (gate then up), got {gate_up.shape[1]}")
    shape = (gate_up.shape[0], gate_up.shape[1] // 2)
    if out is None:
        out = _empty(shape, gate_up.dtype, on_gpu)
    elif tuple(out.shape) != shape or out.dtype != gate_up.dtype:
        raise ValueError(f"out: expected shape {shape} and dtype {gate_up.dtype}, got {tuple(out.shape)} {out.dtype}")
    if not on_gpu:
        return _cpu.silu_mul_cpu(gate_up, out)
    from pagemem.kernels.pointwise import silu_mul_cuda
    return silu_mul_cuda(gate_up, out, kind, stream)


def sample(logits, params, out=None, stream=None):
    """One token id per row of ``logits`` [n, vocab] (fp16, bf16 or fp32) under ``params``
    [NUM_FIELDS, n] int32 (``pack_sampling_params``, which validates the values), written to
    ``out`` [n] int32 and returned. Semantics and the generator: kernels/reference_sampling.py.
    On the GPU one kernel, enqueued without synchronizing; on the CPU the NumPy reference."""
    on_gpu = check_same_device(logits=logits, params=params, **({} if out is None else {"out": out}))
    n = _check_sampling(logits, params)
    if out is None:
        out = _empty((n,), np.int32, on_gpu)
    elif tuple(out.shape) != (n,) or np.dtype(out.dtype) != np.int32:
        raise ValueError(f"out: expected shape ({n},) int32, got {tuple(out.shape)} {np.dtype(out.dtype)}")
    if not on_gpu:
        from pagemem.kernels.reference_sampling import ref_sample
        out[:] = ref_sample(logits, params)
        return out
    from pagemem.kernels.sampling_kernel import sample_cuda
    return sample_cuda(logits, params, out, stream)


def sample_logprobs(logits, params, token_ids, num_top: int, stream=None):
    """(chosen [n] f32, top_ids [n, num_top] int32, top_logprobs [n, num_top] f32): each row's
    log-probability of ``token_ids`` [n] int32 and its ``num_top`` (0..MAX_LOGPROBS) most likely
    tokens (ties by lowest id), after temperature and before top-k/top-p/min-p (temperature 1
    for greedy rows), as vLLM reports them by default."""
    on_gpu = check_same_device(logits=logits, params=params, token_ids=token_ids)
    n = _check_sampling(logits, params)
    check_int_array(token_ids, "token_ids", 1, n)
    if isinstance(num_top, bool) or not isinstance(num_top, (int, np.integer)) \
            or not 0 <= num_top <= min(MAX_LOGPROBS, logits.shape[1]):
        raise ValueError(f"num_top must be an int in [0, {min(MAX_LOGPROBS, logits.shape[1])}], got {num_top!r}")
    if not on_gpu:
        from pagemem.kernels.reference_sampling import ref_logprobs
        return ref_logprobs(logits, params, token_ids, int(num_top))
    import cupy
    from pagemem.kernels.sampling_kernel import logprobs_cuda
    chosen, top_lp = cupy.empty(n, np.float32), cupy.empty((n, max(1, num_top)), np.float32)
    top_ids = cupy.empty((n, max(1, num_top)), np.int32)
    logprobs_cuda(logits, params, token_ids, int(num_top), chosen, top_ids, top_lp, stream)
    return chosen, top_ids[:, :num_top], top_lp[:, :num_top]


def _check_sampling(logits, params) -> int:
    from pagemem.kernels._device import dtype_kind
    dtype_kind(logits.dtype, "logits")
    if logits.ndim != 2 or logits.shape[0] < 1 or not 1 <= logits.shape[1] < 2**31:
        raise ValueError(f"logits: expected [num_rows >= 1, vocab >= 1], got shape {tuple(logits.shape)}")
    if logits.strides[1] != logits.itemsize:
        raise ValueError("logits: the vocabulary axis must be contiguous")
    n = logits.shape[0]
    check_int_array(params, "params", 2, NUM_FIELDS)
    if params.shape[1] != n:
        raise ValueError(f"params: expected [{NUM_FIELDS}, {n}] (one column per row of logits), got {tuple(params.shape)}")
    return n


def _check_rows(x, name: str, ndim: int) -> int:
    from pagemem.kernels._device import dtype_kind
    kind = dtype_kind(x.dtype, name)
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-d, got shape {tuple(x.shape)}")
    return kind


def _empty_like(q):
    return _empty(q.shape, q.dtype, not isinstance(q, np.ndarray))


def _empty(shape, dtype, on_gpu: bool):
    if not on_gpu:
        return np.empty(shape, dtype)
    import cupy
    return cupy.empty(shape, dtype)
