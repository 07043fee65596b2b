"""Our forward and greedy generation against Hugging Face transformers on the same checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import prefill_logits, scale_error
from hf_models import ARCHS
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12], [200, 1, 2], [77]]


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()        # [T, V]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_checkpoints, arch):
    """Ragged prefill of three prompts gives HF's float32 logits within 1e-4 of their scale."""
    path, hf = hf_checkpoints[arch]
    model = load_model(path, device="cpu")
    for ours, prompt in zip(prefill_logits(model, PROMPTS), PROMPTS):
        assert scale_error(ours, _hf_logits(hf, prompt)) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_match_generate(hf_checkpoints, arch):
    """32 greedy tokens (decode through the pool, past Mistral's window of 8) equal HF generate's."""
    path, hf = hf_checkpoints[arch]
    model = load_model(path, device="cpu")
    prompts = [PROMPTS[0], PROMPTS[1]]
    ours = generate(model, prompts, SamplingParams(temperature=0.0, max_tokens=32), page_size=4)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert got == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_float16_path_on_cpu(hf_checkpoints, arch):
    """The half-precision path the GPU runs (fp16 weights and pool, fp32 norms and logits) stays
    within 1e-2 of HF's float32 logits; here through NumPy."""
    path, hf = hf_checkpoints[arch]
    model = load_model(path, dtype="float16", device="cpu")
    assert model.weights["embed.weight"].dtype == np.float16
    ours = prefill_logits(model, [PROMPTS[0]])[0]
    assert ours.dtype == np.float32
    assert scale_error(ours, _hf_logits(hf, PROMPTS[0])) <= 1e-2


def test_float16_greedy_on_cpu(hf_checkpoints):
    """16 greedy float16 tokens equal HF's float32 ones (Llama: top-2 margins >= 0.06 on this prompt)."""
    path, hf = hf_checkpoints["llama"]
    model = load_model(path, dtype="float16", device="cpu")
    got = generate(model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16), page_size=4)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert got == ref[0, len(PROMPTS[0]):].tolist()
