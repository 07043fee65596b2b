"""GGUF files written here with gguf's GGUFWriter: tiny random Llama and Qwen2 models in every
supported tensor type load and match transformers' own GGUF loader on the same file (tensors
exactly, logits, greedy tokens); Llama 3 RoPE factors, the tokenizer, and bad files."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from transformers.utils.quantization_config import GgufConfig

from _helpers import prefill_logits, scale_error
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.gguf import load_gguf_weights, metadata, config_from_gguf, open_gguf, unpermute_qk
from pagemem.models.weights import tensor_specs

TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.2)
HF_CONFIGS = {"llama": lambda: tf.LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_theta=10000.0),
              "qwen2": lambda: tf.Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_theta=1000.0,
                                              rms_norm_eps=1e-6)}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12], [200, 1, 2]]


def random_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(HF_CONFIGS[arch](), attn_implementation="eager").eval()


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a Llama's Q/K rows: per head, rows (i, i + d/2) -> (2i, 2i + 1)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's state dict under GGUF names, Q/K permuted as llama.cpp writes a Llama."""
    c, out = model.config, {}
    for name, t in model.state_dict().items():
        data = t.detach().float().numpy()
        if name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["output.weight"] = data
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]] = data
            continue
        _, _, layer, *module, kind = name.split(".")
        gname = f"blk.{layer}.{_LAYER['.'.join(module)]}.{kind}"
        if arch == "llama" and module[-1] in ("q_proj", "k_proj"):
            data = llama_cpp_permute(data, c.num_attention_heads if module[-1] == "q_proj" else c.num_key_value_heads)
        out[gname] = data
    return out


def write_gguf(path: Path, model, qtype: str, arch: str, *, file_arch: str | None = None, drop_key: str = "",
               extra_tensors: dict | None = None, tokenizer=None) -> Path:
    """Write ``model`` as a GGUF file: 2-D weights in ``qtype`` (gguf's own quantize), 1-D in F32."""
    c = model.config
    w = gguf.GGUFWriter(path, file_arch or arch)
    keys = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "rope.dimension_count": c.hidden_size // c.num_attention_heads}
    for key, value in keys.items():
        if key != drop_key:
            w.add_uint32(f"{file_arch or arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if tokenizer is not None:
        tokenizer(w)
    t = gguf.GGMLQuantizationType[qtype]
    for name, data in {**gguf_tensors(model, arch), **(extra_tensors or {})}.items():
        if data.ndim == 1 or t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif t == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(np.ascontiguousarray(data), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: Path) -> torch.nn.Module:
    """transformers' reading of the same file (its GGUF loader, dequantized to float32)."""
    return tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                   quantization_config=GgufConfig(dequantize=True),
                                                   attn_implementation="eager").eval()


def _our_tensors(path: Path) -> tuple[dict, dict]:
    reader = open_gguf(path)
    config = config_from_gguf(metadata(reader), {t.name for t in reader.tensors}, path)
    return load_gguf_weights(reader, config, np.float32, np, path), tensor_specs(config)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_tiny_gguf_matches_transformers(tmp_path, arch, qtype):
    """Every tensor equals transformers' from the same file; logits within 1e-4 of their scale;
    16 greedy tokens equal its generate."""
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", random_hf(arch), qtype, arch)
    hf = hf_from_gguf(path)
    ours, specs = _our_tensors(path)
    sd = hf.state_dict()
    for name, spec in specs.items():
        np.testing.assert_array_equal(ours[name], sd[spec.hf_name].numpy(), err_msg=name)
    model = load_model(path, device="cpu")
    assert model.config.arch == arch and model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    for logits, prompt in zip(prefill_logits(model, PROMPTS), PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert scale_error(logits, ref) <= 1e-4
    got = generate(model, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16), page_size=4)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=16, do_sample=False)[0, len(PROMPTS[0]):]
    assert got == want.tolist()


@pytest.mark.parametrize("arch", sorted(HF_CONFIGS))
def test_f32_file_gives_back_the_original_weights(tmp_path, arch):
    """Independently of transformers' loader: an F32 file written from a model loads as exactly
    that model's tensors (the Q/K rows back in Hugging Face order)."""
    hf = random_hf(arch, seed=1)
    ours, specs = _our_tensors(write_gguf(tmp_path / "f32.gguf", hf, "F32", arch))
    sd = hf.state_dict()
    for name, spec in specs.items():
        np.testing.assert_array_equal(ours[name], sd[spec.hf_name].numpy(), err_msg=name)


def test_unpermute_qk_inverts_the_converter():
    """Rows of 2 heads of d=4: llama.cpp writes head rows (0, 2, 1, 3); unpermute restores 0..3."""
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)                    # [heads * d, H]
    on_disk = llama_cpp_permute(w, 2)
    assert on_disk[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    np.testing.assert_array_equal(unpermute_qk(on_disk, 2), w)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w[:, 0], 4), 4), w[:, 0])   # a bias [heads * d]


def test_llama3_rope_factors_tensor(tmp_path, hf_checkpoints):
    """A Llama 3 file carries its RoPE scaling as ``rope_freqs.weight`` (per-pair divisors, as
    llama.cpp writes them). The tiny Llama of hf_models has llama3 scaling: written to GGUF with
    those factors, it gives the logits of transformers' safetensors model."""
    _, hf = hf_checkpoints["llama"]
    d = hf.config.head_dim
    base = 1.0 / hf.config.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d)
    factors = (base / hf.model.rotary_emb.inv_freq.numpy()).astype(np.float32)              # [d / 2]
    assert factors.max() > 1.5                                                              # scaling is active
    path = write_gguf(tmp_path / "llama3.gguf", hf, "F32", "llama", extra_tensors={"rope_freqs.weight": factors})
    model = load_model(path, device="cpu")
    for logits, prompt in zip(prefill_logits(model, PROMPTS), PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert scale_error(logits, ref) <= 1e-4


# ---- the tokenizer --------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _add_tiny_vocab(w: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary of VOCAB tokens: control tokens, the 256 byte symbols, merges."""
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ c", "a t", "Ġc at", "o n", "Ġ s", "1 2", "Ġ 1"]
    merged = ["".join(m.split(" ")) for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet + merged
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    types = [3] * 3 + [1] * (len(alphabet) + len(merged)) + [5] * (VOCAB - len(specials) - len(alphabet) - len(merged))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)


def test_gguf_tokenizer_matches_transformers(tmp_path):
    """The vocabulary and merges of the file tokenize as transformers' GGUF tokenizer does; control
    tokens stay whole and are skipped when decoding; digits split one by one ('smollm')."""
    path = write_gguf(tmp_path / "tok.gguf", random_hf("llama"), "F32", "llama", tokenizer=_add_tiny_vocab)
    model = load_model(path, device="cpu")
    ref = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = model.tokenizer
    for text in ("the cat sat on the mat", "<|im_start|>user\nin the cat<|im_end|>\n", "Ünïcode ✓  spaces\n\n"):
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text)) == ref.decode(tok.encode(text), skip_special_tokens=True)
    assert tok.encode("<|im_end|>") == [2] and tok.decode([1, 300, 2]) == tok.decode([300])
    assert [tok.decode([i]) for i in tok.encode("a 123")] == ["a", " ", "1", "2", "3"]      # merges " 1", "12" unused
    assert [tok.decode([i]) for i in tok.encode("a b12")] == ["a", " ", "b", "1", "2"]
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == ("<|im_start|>", "<|im_end|>", CHATML)
    assert model.eos_token_ids == (2,)


# ---- bad files --------------------------------------------------------------------------------
@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "ok.gguf", random_hf("llama"), "Q8_0", "llama")


def test_truncated_file_names_the_file(tiny_file):
    data = tiny_file.read_bytes()
    for cut in (len(data) - 100, 1000, 35, 10, 0):   # in the tensor data, the tensor list, a key, the header
        tiny_file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{tiny_file}: truncated or corrupt GGUF file \({cut} bytes\)"):
            load_model(tiny_file, device="cpu")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUX" + bytes(100))
    with pytest.raises(ValueError, match=r"model.gguf: truncated or corrupt GGUF file.*magic"):
        load_model(bad, device="cpu")
    with pytest.raises(FileNotFoundError, match="is not a folder, nor a .gguf file"):
        load_model(tmp_path / "missing.gguf", device="cpu")


def test_unknown_architecture_names_the_field(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", random_hf("llama"), "F32", "llama", file_arch="mamba")
    with pytest.raises(ValueError, match=r"mamba.gguf: GGUF field 'general.architecture' is 'mamba'; supported: llama, qwen2"):
        load_model(path, device="cpu")


def test_missing_field_names_it(tmp_path):
    path = write_gguf(tmp_path / "nolayers.gguf", random_hf("llama"), "F32", "llama", drop_key="block_count")
    with pytest.raises(ValueError, match=r"nolayers.gguf: GGUF field 'llama.block_count' is missing"):
        load_model(path, device="cpu")


def test_unsupported_tensor_type_names_type_and_tensor(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", random_hf("llama"), "Q5_0", "llama")
    with pytest.raises(ValueError, match=r"q5.gguf: tensor 'token_embd.weight' has type Q5_0; "
                                         r"supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0"):
        load_model(path, device="cpu")


def test_unexpected_or_misshapen_tensor_names_it(tmp_path):
    hf = random_hf("llama")
    path = write_gguf(tmp_path / "extra.gguf", hf, "F32", "llama", extra_tensors={"blk.0.mystery.weight": np.ones(4)})
    with pytest.raises(ValueError, match=r"extra.gguf: unexpected tensor 'blk.0.mystery.weight'"):
        load_model(path, device="cpu")
    path = write_gguf(tmp_path / "short.gguf", hf, "F32", "llama", extra_tensors={"output_norm.weight": np.ones(8)})
    with pytest.raises(ValueError, match=r"short.gguf: tensor 'output_norm.weight' has shape \[8\], expected \[64\]"):
        load_model(path, device="cpu")


def test_unknown_pre_tokenizer_names_the_field(tmp_path):
    def vocab(w):
        _add_tiny_vocab(w)
        w.kv_data[0]["tokenizer.ggml.pre"] = gguf.GGUFValue("mystery", gguf.GGUFValueType.STRING)
    path = write_gguf(tmp_path / "pre.gguf", random_hf("llama"), "F32", "llama", tokenizer=vocab)
    with pytest.raises(ValueError, match=r"pre.gguf: GGUF field 'tokenizer.ggml.pre' is 'mystery'"):
        load_model(path, device="cpu")
