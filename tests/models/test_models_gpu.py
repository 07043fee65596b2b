"""On a CUDA device: float16 parity with transformers, and a random Llama-3.2-1B forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import prefill_logits, scale_error
from hf_models import ARCHS
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.backend import to_host

pytestmark = pytest.mark.gpu
PROMPT = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_logits_match_transformers(hf_checkpoints, arch):
    """float16 weights on the GPU give transformers' float32 logits within 1e-2 of their scale."""
    path, hf = hf_checkpoints[arch]
    model = load_model(path, dtype="float16", device="cuda")
    ours = prefill_logits(model, [PROMPT, PROMPT[:5]])
    for got, prompt in zip(ours, [PROMPT, PROMPT[:5]]):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert scale_error(got, ref) <= 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])   # top-2 margins >= 0.045 here; Mistral's is 0.01
def test_fp16_greedy_16_tokens_match_generate(hf_checkpoints, arch):
    path, hf = hf_checkpoints[arch]
    model = load_model(path, dtype="float16", device="cuda")
    got = generate(model, [PROMPT], SamplingParams(temperature=0.0, max_tokens=16), page_size=4)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert got == ref[0, len(PROMPT):].tolist()


def test_random_llama_3_2_1b_forward_runs():
    """random:llama-3.2-1b (fp16, on the device) prefills and decodes a batch with finite, spread logits."""
    model = load_model("random:llama-3.2-1b", device="cuda")
    assert model.weights["layers.0.qkv.weight"].dtype == np.float16
    logits = prefill_logits(model, [list(range(1, 40)), [7, 8, 9]], page_size=16)
    assert all(np.isfinite(x).all() and x.shape[1] == 128256 and x.std() > 0.1 for x in logits)
    out = generate(model, [[128000, 1, 2, 3], [128000, 9]], SamplingParams(temperature=0.0, max_tokens=8,
                                                                            ignore_eos=True))
    assert [len(o) for o in out] == [8, 8]


def test_bf16_checkpoint_to_fp16_on_device(hf_checkpoints):
    """Mistral's bf16 tensors go up as bits and become float16 on the device with torch's values."""
    path, hf = hf_checkpoints["mistral"]
    model = load_model(path, dtype="float16", device="cuda")
    got = to_host(model.weights["layers.0.qkv.weight"][:64])       # q_proj's rows
    assert got.dtype == np.float16
    ref = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy().astype(np.float16)
    np.testing.assert_array_equal(got, ref)


def test_fused_prefill_in_a_model_matches_transformers(tmp_path):
    """Qwen2.5-0.5B's attention shape (14 query heads on 2 KV heads, GQA 7, head_dim 64) takes the
    fused prefill kernel, packed rows and all; fp16 logits of a ragged batch (170 and 37 tokens,
    page size 16) and 16 greedy tokens through the engine match transformers."""
    import cupy as cp
    import transformers as tf

    from pagemem import kernels
    from pagemem.models import LLM
    cfg = tf.Qwen2Config(vocab_size=300, hidden_size=896, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, initializer_range=0.05, tie_word_embeddings=False,
                         attn_implementation="eager")
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path)
    hf = tf.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(tmp_path, dtype="float16", device="cuda")
    fused_cache = cp.empty((2, 16, 2, 64), cp.float16)
    assert kernels.prefill_is_fused(fused_cache)
    assert kernels.prefill_calls(fused_cache, [2000, 2000, 8], [2000, 2000, 8]) == [(0, 3)]   # one call: no padding
    assert kernels.prefill_warmup_lengths(fused_cache, 1000) == [64]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, 170).tolist(), rng.integers(0, 300, 37).tolist()]
    for got, prompt in zip(prefill_logits(model, prompts, page_size=16), prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert scale_error(got, ref) <= 1e-2
    out = LLM(model, num_pages=64, swap_space=0).generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=16,
                                                                                      ignore_eos=True))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts[:1]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0].token_ids == ref[0, 170:].tolist()
