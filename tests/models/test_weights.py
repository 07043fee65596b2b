"""Safetensors loading: names of every architecture, bf16, and one clear error per bad checkpoint."""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from pagemem.models import ModelConfig, load_model
from pagemem.models.weights import load_weights, read_header, read_tensor


def _copy(hf_checkpoints, arch, tmp_path):
    dst = tmp_path / arch
    shutil.copytree(hf_checkpoints[arch][0], dst)
    return dst


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_bf16_is_read_as_ml_dtypes_bfloat16(hf_checkpoints):
    """Mistral was saved in bf16: tensors come back as ml_dtypes.bfloat16 with torch's exact values."""
    path, hf = hf_checkpoints["mistral"]
    infos = read_header(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert infos[name].dtype == "BF16"
    host = read_tensor(infos[name], name)
    assert host.dtype == np.dtype(ml_dtypes.bfloat16) and host.shape == (64, 64)
    ref = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()   # float32 of the bf16 values
    np.testing.assert_array_equal(host.astype(np.float32), ref)
    w = load_weights(path, ModelConfig.from_hf(path), np.float32)
    np.testing.assert_array_equal(w["layers.0.q.weight"], ref)          # through the bits path
    assert w["layers.0.q.weight"].dtype == np.float32


def test_bf16_kept_when_asked(hf_checkpoints):
    path = hf_checkpoints["mistral"][0]
    w = load_weights(path, ModelConfig.from_hf(path), ml_dtypes.bfloat16)
    assert w["embed.weight"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_sharded_qwen2_with_biases(hf_checkpoints):
    path, hf = hf_checkpoints["qwen2"]
    assert (path / "model.safetensors.index.json").is_file()
    w = load_weights(path, ModelConfig.from_hf(path), np.float16)
    ref = hf.model.layers[1].self_attn.k_proj.bias.detach().numpy()
    np.testing.assert_array_equal(w["layers.1.k.bias"], ref.astype(np.float16))


def test_gpt2_conv1d_transposed_and_prefix_optional(hf_checkpoints, tmp_path):
    """GPT-2's [in, out] Conv1D weights load as [out, in] views, with or without 'transformer.'."""
    path = _copy(hf_checkpoints, "gpt2", tmp_path)
    hf = hf_checkpoints["gpt2"][1]
    _rewrite(path / "model.safetensors", lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    assert "wte.weight" in read_header(path / "model.safetensors")
    w = load_weights(path, ModelConfig.from_hf(path), np.float32)
    np.testing.assert_array_equal(w["layers.0.qkv.weight"], hf.transformer.h[0].attn.c_attn.weight.detach().numpy().T)
    assert w["lm_head.weight"] is w["embed.weight"]


def test_gpt2_causal_mask_buffers_are_ignored(hf_checkpoints, tmp_path):
    """An old GPT-2 file's causal-mask buffer (attn.bias) loads as nothing: the weights are the
    ones a file without it gives, the layer's real biases and weights untouched."""
    path = _copy(hf_checkpoints, "gpt2", tmp_path)
    plain = load_weights(path, ModelConfig.from_hf(path), np.float32)
    _rewrite(path / "model.safetensors", lambda t: t.update({"transformer.h.0.attn.bias": np.ones((1, 1, 4, 4), np.float32)}))
    w = load_weights(path, ModelConfig.from_hf(path), np.float32)
    assert w.keys() == plain.keys()
    for name in ("layers.0.qkv.weight", "layers.0.qkv.bias", "layers.0.o.bias"):
        np.testing.assert_array_equal(w[name], plain[name])


@pytest.mark.parametrize("arch, edit, match", [
    ("llama", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
    ("llama", lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
     "model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"),
    ("gpt2", lambda t: t.update({"transformer.h.0.attn.c_proj.weight": np.zeros((32, 64), np.float32)}),
     r"model.safetensors: tensor 'transformer.h.0.attn.c_proj.weight' has shape \[32, 64\], expected \[64, 64\]"),
    ("llama", lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}), "'model.norm.weight' has dtype I32"),
])
def test_bad_tensor_is_named_with_its_file(hf_checkpoints, tmp_path, arch, edit, match):
    path = _copy(hf_checkpoints, arch, tmp_path)
    _rewrite(path / "model.safetensors", edit)
    with pytest.raises(ValueError, match=match):
        load_model(path, device="cpu")


def test_qwen2_missing_bias_in_a_shard(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints, "qwen2", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.v_proj.bias"
    _rewrite(path / index[name], lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"'{name}' is missing"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("cut", [4, 100, 1000])
def test_truncated_file(hf_checkpoints, tmp_path, cut):
    """Cutting the file's tail (or into its header) names the file, and the tensor whose bytes are gone."""
    path = _copy(hf_checkpoints, "llama", tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut < 100 else data[:-cut])
    match = "model.safetensors: truncated" + ("" if cut < 100 else ".*tensor '")
    with pytest.raises(ValueError, match=match):
        load_model(path, device="cpu")


def test_missing_shard_and_missing_weights(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints, "qwen2", tmp_path)
    (path / "model-00002-of-00012.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00012.safetensors"):
        load_model(path, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(path / "config.json", empty)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(empty, device="cpu")


def test_torch_reads_what_we_check(hf_checkpoints):
    """Sanity of the fixture: our canonical embedding equals the torch model's."""
    path, hf = hf_checkpoints["llama"]
    w = load_model(path, device="cpu").weights
    np.testing.assert_array_equal(w["embed.weight"], hf.model.embed_tokens.weight.detach().numpy())
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


def test_gpt2_untied_head_is_required_and_loaded(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints, "gpt2", tmp_path)
    cfg = json.loads((path / "config.json").read_text()) | {"tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'lm_head.weight' is missing"):
        load_model(path, device="cpu")
    head = np.arange(300 * 64, dtype=np.float32).reshape(300, 64)
    _rewrite(path / "model.safetensors", lambda t: t.update({"lm_head.weight": head}))
    w = load_model(path, device="cpu").weights
    np.testing.assert_array_equal(w["lm_head.weight"], head)
    assert w["lm_head.weight"] is not w["embed.weight"]


def test_load_model_fuses_projections(hf_checkpoints):
    """Qwen2's q/k/v (with biases) and gate/up become one matrix each, parts dropped."""
    path, hf = hf_checkpoints["qwen2"]
    w = load_model(path, device="cpu").weights
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    ref = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().numpy()
    np.testing.assert_array_equal(w["layers.1.qkv.bias"], ref)
    ref = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().numpy()
    np.testing.assert_array_equal(w["layers.1.gate_up.weight"], ref)
    assert not {"layers.1.q.weight", "layers.1.k.bias", "layers.1.up.weight"} & set(w)


def _raw_safetensors(file, header, data: bytes = b"") -> None:
    """A safetensors file written by hand: 8-byte length, the JSON header, the data."""
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, match", [
    ([1, 2], "corrupt safetensors header \\(a JSON list, not an object\\)"),
    ("text", "corrupt safetensors header \\(a JSON str"),
    ({"w": [0, 4]}, "corrupt safetensors header entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [True, 4]}}, "entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, "entry for tensor 'w'"),
    ({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "entry for tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "holds 8 bytes, its offsets give 4"),
])
def test_malformed_headers_are_value_errors(tmp_path, header, match):
    """Headers a writer could get wrong: each a ValueError naming the file (a JSON list header
    used to fail inside dict.pop: 'pop expected at most 1 argument, got 2')."""
    file = tmp_path / "model.safetensors"
    _raw_safetensors(file, header, bytes(16))
    with pytest.raises(ValueError, match=match):
        read_header(file)


def test_bad_index_file_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints, "qwen2", tmp_path)
    index = path / "model.safetensors.index.json"
    for text in ("{", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}', "[]"):
        index.write_text(text)
        with pytest.raises(ValueError, match="model.safetensors.index.json: (invalid JSON|no 'weight_map')"):
            load_model(path, device="cpu")
