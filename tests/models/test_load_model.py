"""load_model's arguments and the Model it returns."""
from __future__ import annotations

import numpy as np
import pytest

from pagemem.models import Model, load_model
from pagemem.models.tokenizer import ByteTokenizer


def test_model_fields_and_pool_config(hf_checkpoints):
    m = load_model(hf_checkpoints["qwen2"][0], device="cpu")
    assert isinstance(m, Model) and m.device == "cpu" and m.dtype == np.float32 and m.xp is np
    assert isinstance(m.tokenizer, ByteTokenizer)            # no tokenizer.json in the folder
    pc = m.pool_config(num_pages=9, page_size=8)
    assert (pc.num_pages, pc.page_size, pc.num_layers, pc.num_kv_heads, pc.head_dim, pc.dtype) == \
        (9, 8, 2, 2, 16, "float32")
    assert m.pool_config(4, dtype="float16").dtype == "float16"


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dtype": "int8"}, ValueError, r"dtype must be one of .*float16.*, got 'int8'"),
    ({"device": "tpu"}, ValueError, r"device must be one of .*'cuda'.*, got 'tpu'"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_model("random:tiny", **kwargs)


def test_path_must_be_a_folder_or_random(tmp_path):
    with pytest.raises(FileNotFoundError, match="random:<preset>"):
        load_model(tmp_path / "missing", device="cpu")


def test_random_seed_changes_weights():
    a, b = load_model("random:tiny", seed=0), load_model("random:tiny", seed=1)
    assert not np.array_equal(a.weights["layers.0.qkv.weight"], b.weights["layers.0.qkv.weight"])
