"""Tiny random Hugging Face models written with ``save_pretrained``: the reference checkpoints.

One per architecture, each exercising something: Llama (tied head, llama3 RoPE scaling, GQA),
Qwen2 (q/k/v biases, sharded files), Mistral (sliding window 8, saved in bfloat16), GPT-2
(LayerNorm, fused Conv1D attention, learned positions).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
               pad_token_id=None, initializer_range=0.2, attn_implementation="eager")


def hf_config(arch: str):
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=True, rope_theta=10000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=False, rope_theta=1000.0)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=8)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=None, eos_token_id=None, initializer_range=0.2,
                             attn_implementation="eager")
    raise ValueError(arch)


def save_hf_model(arch: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a random ``arch`` model to ``path``; return transformers' float32 model read back from it
    (for Mistral: the bf16 values, with RoPE buffers computed afresh in float32)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    kwargs = {"max_shard_size": "40KB"} if arch == "qwen2" else {}
    if arch == "mistral":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
