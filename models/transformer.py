"""The forward pass, written once against the array module ``xp`` (NumPy on the CPU, CuPy on CUDA).

Shape legend: T new tokens in the batch (ragged over sequences), H hidden size, nh query heads,
nkv K/V heads, d head_dim, I MLP width, V vocabulary.

``forward`` expects the weights of ``models.weights`` with q/k/v and gate/up fused
(``fuse_projections``; ``load_model`` does it).

Every step's state comes in as arguments: the weights, the new tokens and their positions, the
PagedBatch saying where each sequence's K/V lives, and the pool holding it. Each layer writes the
new tokens' K/V into the pool (``kernels.store_kv``), then attends over the pages: decode rows (one
new token each, packed first) through ``kernels.paged_decode``, prefill rows through
``kernels.paged_prefill`` (``attention_groups``: one call, or groups of similar length). RMSNorm with its residual
add, RoPE and SwiGLU are one kernel each (``kernels.rms_norm``, ``apply_rope``, ``silu_mul``); the
residual stream is the forward's own array (the embedding gather) and is updated in place.
Math runs in the weights' dtype (float32 on the CPU, float16 on a GPU). Norm statistics, RoPE
angles, GELU and the attention softmax run in float32; logits are returned as float32 (on a GPU
the LM head's GEMM accumulates in float32 and its output is rounded to float16 first: an fp32
copy of a 128k-row head would cost more than the step).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pagemem import kernels
from pagemem.models.config import ModelConfig, rope_inv_freq
from pagemem import PagedBatch, PagePool
from pagemem.backend import module_of

Array = Any  # numpy.ndarray or cupy.ndarray
_F32 = np.float32


def rope_buffer(config: ModelConfig, xp=np) -> Array:
    """Inverse RoPE frequencies [d // 2] float32 (scaling applied), stored as weights["rope.inv_freq"]."""
    return xp.asarray(np.asarray(rope_inv_freq(config), dtype=_F32))


def fuse_projections(config: ModelConfig, weights: dict[str, Array]) -> dict[str, Array]:
    """In place: q/k/v -> ``qkv`` [(nh + 2 * nkv) * d, H] and gate/up -> ``gate_up`` [2 * I, H]
    (weights and biases), so each is one GEMM instead of three or two. Each part is dropped as
    soon as it is fused, so memory peaks one layer's projections above the model.
    GPT-2 checkpoints come fused already."""
    if config.is_gpt2:
        return weights
    xp = module_of(weights["embed.weight"])
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        for fused, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
            for kind in ("weight", "bias"):
                names = [f"{p}{n}.{kind}" for n in parts]
                if names[0] in weights:
                    weights[f"{p}{fused}.{kind}"] = xp.concatenate([weights.pop(n) for n in names])
    return weights


# ---- building blocks --------------------------------------------------------------------------
def matmul_t(x: Array, w: Array) -> Array:
    """x [T, in] @ w[out, in].T -> [T, out]: the default product of ``linear``."""
    return x @ w.T


def linear(x: Array, w: Array, b: Array | None = None, mm=matmul_t) -> Array:
    """mm(x [T, in], w [out, in]) (+ b [out]) -> [T, out]. ``mm`` is x @ w.T unless a caller
    substitutes another implementation of the same product (the CUDA-graph decode does)."""
    y = mm(x, w)
    return y if b is None else y + b


def layer_norm(x: Array, w: Array, b: Array, eps: float) -> Array:
    """LayerNorm over H in float32, back to x's dtype."""
    xf = x.astype(_F32, copy=False)
    xf = xf - xf.mean(axis=-1, keepdims=True)
    xf = xf / module_of(x).sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)
    return (xf * w + b).astype(x.dtype, copy=False)


def gelu_tanh(x: Array) -> Array:
    """GPT-2's gelu_new, in float32 (x^3 overflows float16)."""
    xp = module_of(x)
    xf = x.astype(_F32, copy=False)
    y = 0.5 * xf * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)))
    return y.astype(x.dtype, copy=False)


def norm(config: ModelConfig, w: dict, name: str, x: Array) -> Array:
    if config.is_gpt2:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], config.norm_eps)
    return kernels.rms_norm(x, w[name + ".weight"], config.norm_eps)


def add_norm(config: ModelConfig, w: dict, name: str, residual: Array, x: Array) -> tuple[Array, Array]:
    """(residual + x, norm of it). RMSNorm models add into ``residual`` in place, in the same
    kernel as the norm; GPT-2 adds, then normalizes."""
    if config.is_gpt2:
        residual = residual + x
        return residual, norm(config, w, name, residual)
    return residual, kernels.rms_norm(x, w[name + ".weight"], config.norm_eps, residual=residual)


# ---- one layer ----------------------------------------------------------------------------------
def attention(config: ModelConfig, w: dict, layer: int, x: Array, rope: tuple | None,
              batch: PagedBatch, pool: PagePool, mm=matmul_t, groups: list | None = None,
              plans: dict | None = None) -> Array:
    """Self-attention of the new tokens over their sequences' pages. x [T, H] -> [T, H].
    ``groups``: attention_groups(batch, pool) when the caller computed it once for every layer;
    ``plans``: the step's decode plans by sliding window, filled on first use and shared by layers."""
    p, T, d = f"layers.{layer}.", x.shape[0], config.head_dim
    nh, nkv = config.num_heads, config.num_kv_heads
    qkv = linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias"), mm)         # [T, (nh + 2 * nkv) * d]
    heads = qkv.reshape(T, nh + 2 * nkv, d)
    if rope is not None:
        kernels.apply_rope(heads[:, :nh + nkv], *rope)                     # q and k heads, in place
    q, k, v = heads[:, :nh], heads[:, nh:nh + nkv], heads[:, nh + nkv:]   # views
    k_cache, v_cache = pool.layer_kv(layer)                                # [num_pages, page_size, nkv, d]
    q, k, v = (_in_dtype(a, k_cache.dtype) for a in (q, k, v))
    kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    scale, window = 1.0 / math.sqrt(d), config.layer_window(layer)
    groups = attention_groups(batch, pool) if groups is None else groups
    out = _paged_attention(q, k_cache, v_cache, batch, scale, window, groups, plans)  # [T, nh, d]
    return linear(out.reshape(T, nh * d).astype(x.dtype, copy=False), w[p + "o.weight"], w.get(p + "o.bias"), mm)


def _paged_attention(q: Array, k_cache: Array, v_cache: Array, batch: PagedBatch, scale: float,
                     window: int | None, groups: list[tuple[int, int]], plans: dict | None = None) -> Array:
    """Decode rows (one new token each, packed first) through a decode plan made once per step
    (per sliding window), the rest through paged_prefill in ``groups`` of rows
    (attention_groups). Decode rows never ride along with a prompt. q [T, nh, d] -> [T, nh, d]."""
    nd, n = batch.num_decode_seqs, batch.num_seqs
    pt, ctx, qsl = batch.page_tables, batch.context_lens, batch.query_start_loc
    plans = {} if plans is None else plans
    if nd and window not in plans:
        host = None if batch.host_context_lens is None else batch.host_context_lens[:nd]
        plans[window] = kernels.plan_decode(pt[:nd], ctx[:nd], q.shape[1], k_cache, scale=scale,
                                            sliding_window=window, host_context_lens=host)
    if nd == n:
        return plans[window].run(q, k_cache, v_cache)
    out = module_of(q).empty_like(q)
    if nd:
        plans[window].run(q[:nd], k_cache, v_cache, out[:nd])
    if batch.host_query_lens is None:        # a PagedBatch built by hand: one call for every row
        kernels.paged_prefill(q[nd:], k_cache, v_cache, pt[nd:], ctx[nd:], qsl[nd:] - nd, scale=scale,
                              out=out[nd:], sliding_window=window, max_query_len=batch.max_query_len or None)
        return out
    qlens, ps = batch.host_query_lens, k_cache.shape[1]
    starts = np.concatenate(([0], np.cumsum(qlens)))
    for a, b in groups:
        t0, t1 = int(starts[a]), int(starts[b])
        pages = -(-int(batch.host_context_lens[a:b].max()) // ps)
        kernels.paged_prefill(q[t0:t1], k_cache, v_cache, pt[a:b, :pages], ctx[a:b], qsl[a:b + 1] - t0,
                              scale=scale, out=out[t0:t1], sliding_window=window,
                              max_query_len=int(qlens[a:b].max()))
    return out


def attention_groups(batch: PagedBatch, pool: PagePool) -> list[tuple[int, int]]:
    """The prefill rows' paged_prefill calls, the same for every layer (``kernels.prefill_calls``
    decides, by the route the pool's caches take): row ranges [a, b) of the batch. One call
    without host lengths (a PagedBatch built by hand)."""
    nd, n = batch.num_decode_seqs, batch.num_seqs
    if batch.host_query_lens is None:
        return [(nd, n)]
    calls = kernels.prefill_calls(pool.layer_kv(0)[0], batch.host_query_lens[nd:], batch.host_context_lens[nd:])
    return [(nd + a, nd + b) for a, b in calls]


def _in_dtype(x: Array, dtype) -> Array:
    """x in ``dtype``; a strided view of the qkv projection is passed as it is (the kernels read
    rows at any stride), converted (and so made contiguous) only when the dtype differs."""
    return x if x.dtype == dtype else module_of(x).ascontiguousarray(x.astype(dtype))


def mlp(config: ModelConfig, w: dict, layer: int, x: Array, mm=matmul_t) -> Array:
    """SwiGLU (Llama family) or GELU (GPT-2) MLP. x [T, H] -> [T, H]."""
    p, I = f"layers.{layer}.", config.intermediate_size
    if config.is_gpt2:
        h = gelu_tanh(linear(x, w[p + "up.weight"], w[p + "up.bias"], mm))  # [T, I]
    else:
        gate_up = linear(x, w[p + "gate_up.weight"], w.get(p + "gate_up.bias"), mm)  # [T, 2 * I]
        h = kernels.silu_mul(gate_up)                                      # [T, I]
    return linear(h, w[p + "down.weight"], w.get(p + "down.bias"), mm)


# ---- the whole model ------------------------------------------------------------------------------
def forward(config: ModelConfig, weights: dict[str, Array], token_ids: Array, positions: Array,
            batch: PagedBatch, pool: PagePool, *, all_logits: bool = False, mm=matmul_t, out=None) -> Array:
    """Logits [num_seqs, V] float32 for each sequence's last new token, or [T, V] with all_logits.
    ``mm(x, w)`` computes every x @ w.T (default: the array module's matmul). ``out``: a float32
    array of that shape to write the logits into (the LM head's output is cast on the way in, one
    pass, where a fresh float32 array and a copy would be two); it is returned.

    token_ids, positions: [T] ints, ordered as ``batch.query_start_loc`` says (sequence by
    sequence); the new tokens' K/V are written into ``pool`` at ``batch.slot_mapping``.
    """
    xp = pool.xp
    token_ids, positions = _check_inputs(config, token_ids, positions, batch, pool)
    if out is not None:            # checked before any K/V is written
        shape = (batch.num_tokens if all_logits else batch.num_seqs, config.vocab_size)
        if tuple(out.shape) != shape or out.dtype != _F32:
            raise ValueError(f"out: expected shape {shape} float32, got {tuple(out.shape)} {out.dtype}")
    w = weights
    x = w["embed.weight"][token_ids]                                       # [T, H]
    rope = None
    if config.is_gpt2:
        x = x + w["pos_embed.weight"][positions]
    else:
        rope = (positions, w["rope.inv_freq"])
    groups, plans = attention_groups(batch, pool), {}
    h = norm(config, w, "layers.0.attn_norm", x)                            # x: the residual stream
    for layer in range(config.num_layers):
        a = attention(config, w, layer, h, rope, batch, pool, mm, groups, plans)
        x, h = add_norm(config, w, f"layers.{layer}.mlp_norm", x, a)
        m = mlp(config, w, layer, h, mm)
        if layer + 1 < config.num_layers:
            x, h = add_norm(config, w, f"layers.{layer + 1}.attn_norm", x, m)
    if not all_logits:
        rows = batch.query_start_loc[1:] - 1
        x, m = x[rows], m[rows]                                            # [num_seqs, H]
    _, x = add_norm(config, w, "norm", x, m)
    logits = linear(x, w["lm_head.weight"], None, mm)                      # [*, V]
    if out is None:
        return xp.asarray(logits, dtype=_F32)
    out[...] = logits
    return out


def _check_inputs(config: ModelConfig, token_ids, positions, batch: PagedBatch, pool: PagePool):
    xp, pc = pool.xp, pool.config
    if (pc.num_layers, pc.num_kv_heads, pc.head_dim) != (config.num_layers, config.num_kv_heads, config.head_dim):
        raise ValueError(f"pool has (num_layers, num_kv_heads, head_dim)="
                         f"{(pc.num_layers, pc.num_kv_heads, pc.head_dim)}, the model needs "
                         f"{(config.num_layers, config.num_kv_heads, config.head_dim)}")
    token_ids, positions = xp.asarray(token_ids), xp.asarray(positions)
    for name, arr in (("token_ids", token_ids), ("positions", positions)):
        if arr.ndim != 1 or arr.shape[0] != batch.num_tokens:
            raise ValueError(f"{name} must have shape [{batch.num_tokens}] (batch.num_tokens), got {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got {arr.dtype}")
    return token_ids, positions
