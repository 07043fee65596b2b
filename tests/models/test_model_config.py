"""ModelConfig.from_hf on config.json as transformers 4.x and 5.x write it, and its errors."""
from __future__ import annotations

import json
import math

import pytest

from hf_models import ARCHS, hf_config
from pagemem.models import ModelConfig
from pagemem.models.config import RopeScaling, rope_inv_freq

LLAMA_4X = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}


def _write(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_llama_4x_keys(tmp_path):
    c = ModelConfig.from_hf(_write(tmp_path, LLAMA_4X))
    assert (c.arch, c.head_dim, c.num_kv_heads, c.dtype) == ("llama", 64, 8, "bfloat16")
    assert c.rope_theta == 500000.0 and c.rope_scaling.rope_type == "llama3" and c.rope_scaling.factor == 32.0
    assert c.tie_word_embeddings and c.eos_token_ids == (128001, 128008, 128009)


def test_generation_config_eos_ids_are_added(tmp_path):
    _write(tmp_path, LLAMA_4X | {"eos_token_id": 128001})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (128001, 128009)


def test_5x_rope_parameters_and_dtype(tmp_path):
    cfg = {k: v for k, v in LLAMA_4X.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    cfg |= {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA_4X["rope_scaling"]},
            "dtype": "float16", "head_dim": 128}
    c = ModelConfig.from_hf(_write(tmp_path, cfg))
    assert c.rope_theta == 500000.0 and c.rope_scaling == ModelConfig.from_dict(LLAMA_4X).rope_scaling
    assert (c.dtype, c.head_dim) == ("float16", 128)


def test_4x_linear_scaling_with_type_key():
    cfg = LLAMA_4X | {"rope_scaling": {"type": "linear", "factor": 4.0}}
    c = ModelConfig.from_dict(cfg)
    assert c.rope_scaling == RopeScaling("linear", 4.0)
    plain = ModelConfig.from_dict(LLAMA_4X | {"rope_scaling": None})
    assert rope_inv_freq(c) == pytest.approx([f / 4 for f in rope_inv_freq(plain)])


def test_llama3_frequency_bands():
    """High frequencies are kept, low ones divided by factor, the middle band interpolated."""
    c = ModelConfig.from_dict(LLAMA_4X)
    plain = rope_inv_freq(ModelConfig.from_dict(LLAMA_4X | {"rope_scaling": None}))
    for f, g in zip(plain, rope_inv_freq(c)):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            assert g == f
        elif wavelen > 8192:
            assert g == pytest.approx(f / 32)
        else:
            assert f / 32 < g < f


@pytest.mark.parametrize("arch", ARCHS)
def test_configs_written_by_transformers(tmp_path, arch):
    """config.json from this transformers' save_pretrained parses to the same shapes."""
    hf = hf_config(arch)
    hf.save_pretrained(tmp_path)
    c = ModelConfig.from_hf(tmp_path)
    assert c.arch == arch
    assert c.num_layers == 2 and c.hidden_size == 64 and c.head_dim == 16 and c.vocab_size == 300
    assert c.num_kv_heads == (4 if arch == "gpt2" else 2)
    assert c.tie_word_embeddings == (arch in ("llama", "gpt2"))
    assert c.attention_bias == (arch in ("qwen2", "gpt2"))
    assert c.layer_window(1) == (8 if arch == "mistral" else None)


def test_qwen2_sliding_window_layers():
    base = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "sliding_window": 16, "max_window_layers": 2}
    assert ModelConfig.from_dict(base).sliding_window is None              # use_sliding_window off
    on = ModelConfig.from_dict(base | {"use_sliding_window": True})        # 4.x: layers >= max_window_layers
    assert [on.layer_window(i) for i in range(4)] == [None, None, 16, 16]
    types = ["sliding_attention", "full_attention"] * 2                    # 5.x: layer_types
    on5 = ModelConfig.from_dict(base | {"use_sliding_window": True, "layer_types": types})
    assert [on5.layer_window(i) for i in range(4)] == [16, None, 16, None]


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*MistralForCausalLM.*GPT2LMHeadModel"):
        ModelConfig.from_hf(_write(tmp_path, {"architectures": ["BertModel"], "model_type": "bert"}))


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is unsupported; supported: default"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope type 'linear' needs a 'factor'"),
    ({"num_key_value_heads": 5}, "num_heads=32 must be a multiple of num_kv_heads=5"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is unsupported \(only silu\)"),
    ({"torch_dtype": "int8"}, r"dtype must be one of .*, got 'int8'"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be >= 1"),
    ({"rope_theta": float("nan")}, "'rope_theta' must be finite"),
    ({"sliding_window": 0, "architectures": ["MistralForCausalLM"]}, "'sliding_window' must be >= 1"),
    ({"eos_token_id": [1, -2]}, "'eos_token_id' must hold ids >= 0"),
    ({"architectures": []}, "unsupported architecture"),
])
def test_bad_values_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(LLAMA_4X | change)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_attention_heads", "intermediate_size"])
def test_missing_field_is_a_value_error_naming_it(tmp_path, key):
    """A config.json without a required field: ValueError naming the file and the field (it was
    a bare KeyError, which the CLI printed as a traceback)."""
    cfg = {k: v for k, v in LLAMA_4X.items() if k != key}
    with pytest.raises(ValueError, match=f"config.json: missing field '{key}'"):
        ModelConfig.from_hf(_write(tmp_path, cfg))


def test_missing_gpt2_field_and_missing_file(tmp_path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4}
    with pytest.raises(ValueError, match="missing field 'n_positions'"):
        ModelConfig.from_dict(gpt2)
    with pytest.raises(FileNotFoundError, match=r"no config\.json at .*nowhere"):
        ModelConfig.from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("change, exc, match", [
    ({"architectures": "LlamaForCausalLM"}, TypeError, "'architectures' must be a list of model class names"),
    ({"architectures": [3]}, TypeError, "'architectures' must be a list"),
    ({"hidden_size": "2048"}, TypeError, "'hidden_size' must be an int, got '2048'"),
    ({"num_attention_heads": 2.5}, TypeError, "'num_attention_heads' must be an int"),
    ({"vocab_size": True}, TypeError, "'vocab_size' must be an int"),
    ({"rope_scaling": [1, 2]}, TypeError, "'rope_scaling' must be an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, TypeError, "'factor' must be a number"),
    ({"tie_word_embeddings": "yes"}, TypeError, "'tie_word_embeddings' must be true or false"),
    ({"eos_token_id": "2"}, TypeError, "'eos_token_id' must be an int or a list of ints"),
    ({"bos_token_id": 1.5}, TypeError, "'bos_token_id' must be an int"),
])
def test_mistyped_fields_are_named(change, exc, match):
    """Each mistyped field is named as config.json spells it. A string 'architectures' was read
    letter by letter ("unsupported architecture 'LlamaForCausalLM'; supported: LlamaForCausalLM")."""
    with pytest.raises(exc, match=match):
        ModelConfig.from_dict(LLAMA_4X | change)


@pytest.mark.parametrize("text, exc, match", [
    ("[1, 2]", TypeError, "a config must be a JSON object, got list"),
    ("{", ValueError, "invalid JSON"),
    (b"\xff\xfe\x00", ValueError, "invalid JSON"),
])
def test_config_file_that_is_not_an_object(tmp_path, text, exc, match):
    f = tmp_path / "config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(exc, match=match):
        ModelConfig.from_hf(tmp_path)


def test_bad_generation_config_is_named(tmp_path):
    _write(tmp_path, LLAMA_4X)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(TypeError, match="generation_config.json: field 'eos_token_id'"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="generation_config.json: invalid JSON"):
        ModelConfig.from_hf(tmp_path)
