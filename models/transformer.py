"""The forward pass, written once against the array module ``xp`` (NumPy on the CPU, CuPy on CUDA).

Shape legend: T new tokens in the batch (ragged over sequences), H hidden size, nh query heads,
nkv K/V heads, d head_dim, I MLP width, V vocabulary.

``forward`` expects the weights of ``models.weights`` with q/k/v and gate/up fused
(``fuse_projections``; ``load_model`` does it).

Every step's state comes in as arguments: the weights, the new tokens and their positions, the
PagedBatch saying where each sequence's K/V lives, and the pool holding it. Each layer writes the
new tokens' K/V into the pool (``kernels.store_kv``), then attends over the pages
(``kernels.paged_decode`` when every sequence brings one token, else ``kernels.paged_prefill``).
Math runs in the weights' dtype (float32 on the CPU, float16 on a GPU). Norm statistics, RoPE
angles, GELU and the attention softmax run in float32; logits are returned as float32 (on a GPU
the LM head's GEMM accumulates in float32 and its output is rounded to float16 first: an fp32
copy of a 128k-row head would cost more than the step).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import kernels
from models.config import ModelConfig, rope_inv_freq
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


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """x [T, H] * rsqrt(mean(x^2) + eps) * w, the statistics in float32 (as HF)."""
    xf = x.astype(_F32, copy=False)
    xf = xf / module_of(x).sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype, copy=False)


def layer_norm(x: Array, w: Array, b: Array, eps: float) -> Array:
    """LayerNorm over H in float32, back to x's dtype."""
    xf = x.astype(_F32, copy=False)
    xf = xf - xf.mean(axis=-1, keepdims=True)
    xf = xf / module_of(x).sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)
    return (xf * w + b).astype(x.dtype, copy=False)


def rope_cos_sin(inv_freq: Array, positions: Array, dtype) -> tuple[Array, Array]:
    """cos, sin: [T, 1, d // 2] of positions * inv_freq, angles in float32 (as HF)."""
    xp = module_of(inv_freq)
    angles = positions.astype(_F32)[:, None] * inv_freq[None, :]   # [T, d // 2]
    return xp.cos(angles)[:, None, :].astype(dtype), xp.sin(angles)[:, None, :].astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE (HF's layout: pairs are (i, i + d/2)). x [T, heads, d] -> same."""
    xp = module_of(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: Array) -> Array:
    return x / (1 + module_of(x).exp(-x))


def gelu_tanh(x: Array) -> Array:
    """GPT-2's gelu_new, in float32 (x^3 overflows float16)."""
    xp = module_of(x)
    xf = x.astype(_F32, copy=False)
    y = 0.5 * xf * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)))
    return y.astype(x.dtype, copy=False)


def norm(config: ModelConfig, w: dict, name: str, x: Array) -> Array:
    if config.is_gpt2:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], config.norm_eps)
    return rms_norm(x, w[name + ".weight"], config.norm_eps)


# ---- one layer ----------------------------------------------------------------------------------
def attention(config: ModelConfig, w: dict, layer: int, x: Array, rope: tuple | None,
              batch: PagedBatch, pool: PagePool, mm=matmul_t) -> Array:
    """Self-attention of the new tokens over their sequences' pages. x [T, H] -> [T, H]."""
    p, T, d = f"layers.{layer}.", x.shape[0], config.head_dim
    nh, nkv = config.num_heads, config.num_kv_heads
    qkv = linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias"), mm)         # [T, (nh + 2 * nkv) * d]
    q, k, v = qkv[:, :nh * d], qkv[:, nh * d:(nh + nkv) * d], qkv[:, (nh + nkv) * d:]
    q, k, v = q.reshape(T, nh, d), k.reshape(T, nkv, d), v.reshape(T, nkv, d)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k_cache, v_cache = pool.layer_kv(layer)                                # [num_pages, page_size, nkv, d]
    q, k, v = (_contiguous(a, k_cache.dtype) for a in (q, k, v))
    kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    scale, window = 1.0 / math.sqrt(d), config.layer_window(layer)
    out = _paged_attention(q, k_cache, v_cache, batch, scale, window)         # [T, nh, d]
    return linear(out.reshape(T, nh * d).astype(x.dtype, copy=False), w[p + "o.weight"], w.get(p + "o.bias"), mm)


def _paged_attention(q: Array, k_cache: Array, v_cache: Array, batch: PagedBatch, scale: float,
                     window: int | None) -> Array:
    """Decode rows (one new token each, packed first) through paged_decode, the rest through
    paged_prefill: the prefill kernel pads every sequence to the longest query, so decode rows
    must not ride along with a long prompt. q [T, nh, d] -> [T, nh, d]."""
    nd, n = batch.num_decode_seqs, batch.num_seqs
    pt, ctx, qsl = batch.page_tables, batch.context_lens, batch.query_start_loc
    if nd == n:
        return kernels.paged_decode(q, k_cache, v_cache, pt, ctx, scale=scale, sliding_window=window)
    if nd == 0:
        return kernels.paged_prefill(q, k_cache, v_cache, pt, ctx, qsl, scale=scale, sliding_window=window,
                                     max_query_len=batch.max_query_len or None)
    out = module_of(q).empty_like(q)
    kernels.paged_decode(q[:nd], k_cache, v_cache, pt[:nd], ctx[:nd], scale=scale, out=out[:nd],
                         sliding_window=window)
    kernels.paged_prefill(q[nd:], k_cache, v_cache, pt[nd:], ctx[nd:], qsl[nd:] - nd, scale=scale,
                          out=out[nd:], sliding_window=window, max_query_len=batch.max_query_len or None)
    return out


def _contiguous(x: Array, dtype) -> Array:
    """x in ``dtype``, C-contiguous (the kernels' precondition), copied only when needed."""
    return module_of(x).ascontiguousarray(x.astype(dtype, copy=False))


def mlp(config: ModelConfig, w: dict, layer: int, x: Array, mm=matmul_t) -> Array:
    """SwiGLU (Llama family) or GELU (GPT-2) MLP. x [T, H] -> [T, H]."""
    p, I = f"layers.{layer}.", config.intermediate_size
    if config.is_gpt2:
        h = gelu_tanh(linear(x, w[p + "up.weight"], w[p + "up.bias"], mm))  # [T, I]
    else:
        gate_up = linear(x, w[p + "gate_up.weight"], w.get(p + "gate_up.bias"), mm)  # [T, 2 * I]
        h = silu(gate_up[:, :I]) * gate_up[:, I:]                          # [T, I]
    return linear(h, w[p + "down.weight"], w.get(p + "down.bias"), mm)


# ---- the whole model ------------------------------------------------------------------------------
def forward(config: ModelConfig, weights: dict[str, Array], token_ids: Array, positions: Array,
            batch: PagedBatch, pool: PagePool, *, all_logits: bool = False, mm=matmul_t) -> Array:
    """Logits [num_seqs, V] float32 for each sequence's last new token, or [T, V] with all_logits.
    ``mm(x, w)`` computes every x @ w.T (default: the array module's matmul).

    token_ids, positions: [T] ints, ordered as ``batch.query_start_loc`` says (sequence by
    sequence); the new tokens' K/V are written into ``pool`` at ``batch.slot_mapping``.
    """
    xp = pool.xp
    token_ids, positions = _check_inputs(config, token_ids, positions, batch, pool)
    w = weights
    x = w["embed.weight"][token_ids]                                       # [T, H]
    rope = None
    if config.is_gpt2:
        x = x + w["pos_embed.weight"][positions]
    else:
        rope = rope_cos_sin(w["rope.inv_freq"], positions, x.dtype)
    for layer in range(config.num_layers):
        x = x + attention(config, w, layer, norm(config, w, f"layers.{layer}.attn_norm", x), rope, batch, pool, mm)
        x = x + mlp(config, w, layer, norm(config, w, f"layers.{layer}.mlp_norm", x), mm)
    if not all_logits:
        x = x[batch.query_start_loc[1:] - 1]                               # [num_seqs, H]
    x = norm(config, w, "norm", x)
    return xp.asarray(linear(x, w["lm_head.weight"], None, mm), dtype=_F32)  # [*, V]


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
