"""Tokenizers (tokenizer.json, bytes), random presets with real shapes, and the generate helper."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pagemem.models import PRESETS, SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.presets import preset_config, random_weights
from pagemem.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from pagemem.models.weights import tensor_specs

# parameter counts of the real models (embeddings counted once when tied)
PARAMS = {"llama-3.2-1b": 1.236e9, "llama-3-8b": 8.030e9, "mistral-7b": 7.242e9,
          "qwen2.5-0.5b": 0.494e9, "gpt2": 0.1244e9}


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.BOS and max(ids[1:]) < 256
    assert tok.decode(ids + [tok.EOS]) == "héllo ✓"
    assert ByteTokenizer(1000).decode([256 + 104, 105]) == "hi"   # large random vocab: id % 256


TEXT = "héllo 世界 🙂"


def test_byte_tokenizer_token_bytes():
    tok = ByteTokenizer(1000)
    assert b"".join(tok.token_bytes(i) for i in tok.encode(TEXT)) == TEXT.encode("utf-8")   # BOS: b""
    assert (tok.token_bytes(256 + 0xE4), tok.token_bytes(ByteTokenizer.EOS)) == (b"\xe4", b"")


def test_token_bytes_of_partial_characters():
    """Tokens that are only part of a character decode to U+FFFD alone; their bytes are their
    own, so joined they give the text's UTF-8: a byte-level BPE (a merged token of two of a
    character's three bytes among single bytes) and a SentencePiece vocabulary's byte fallback."""
    from tokenizers import decoders
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    shi = "".join(p for p, _ in spell.pre_tokenize_str("世"))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[shi[:2]] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab, [(shi[0], shi[1])]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    sp_vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "\u2581": 257}
    sp = Tokenizer(models.BPE(sp_vocab, [], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")   # no leading space to compare
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    for raw, merged in ((bpe, vocab[shi[:2]]), (sp, None)):
        tok = HFTokenizer(raw)
        ids = tok.encode(TEXT, add_special_tokens=False)
        assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 6 and (merged is None or merged in ids)
        assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode("utf-8")


def test_hf_tokenizer_json(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    ref = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    ref.pre_tokenizer = pre_tokenizers.Whitespace()
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, vocab_size=3, bos_token_id=None, eos_token_ids=[2])
    assert isinstance(tok, HFTokenizer) and tok.eos_token_ids == (2,)
    assert tok.encode("hello world zzz") == ref.encode("hello world zzz").ids == [1, 2, 0]
    assert tok.decode([1, 2]) == ref.decode([1, 2])


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_shapes_match_the_real_models(name):
    c = preset_config(name)
    n = sum(int(np.prod(s.shape)) for key, s in tensor_specs(c).items())
    assert n == pytest.approx(PARAMS[name], rel=2e-3)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        load_model("random:nope", device="cpu")


def test_random_weights_are_seeded_and_sane():
    c = preset_config("tiny")
    a, b, other = (random_weights(c, np.float32, np, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["layers.0.q.weight"], other["layers.0.q.weight"])
    assert np.std(a["layers.0.q.weight"]) == pytest.approx(1 / np.sqrt(c.hidden_size), rel=0.1)


def test_tiny_generates_deterministically_with_bounded_activations():
    """random:tiny generates max_tokens tokens, the same ones for the same seed, and its logits
    are finite and of unit scale at every position (neither blown up nor collapsed, so that
    sampling with a temperature really draws among several tokens)."""
    from _helpers import prefill_logits
    m = load_model("random:tiny", device="cpu")
    assert set(PRESETS) >= {"tiny", *PARAMS}
    prompts = [m.tokenizer.encode("hello"), m.tokenizer.encode("a longer prompt, to page")]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=12, ignore_eos=True)
    first, again = generate(m, prompts, params), generate(m, prompts, params)
    assert first == again and [len(o) for o in first] == [12, 12]
    assert all(0 <= t < m.config.vocab_size for o in first for t in o)
    for logits in prefill_logits(m, prompts):                        # [len(prompt), V]
        assert np.isfinite(logits).all() and np.abs(logits).max() < 20
        assert 0.3 < logits.std(axis=-1).min() and logits.std(axis=-1).max() < 3


def test_generate_stops_on_eos_and_frees_a_given_pool():
    m = load_model("random:tiny", device="cpu")
    greedy = generate(m, [[256, 1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    stop_at = greedy[2]
    from pagemem import PagePool
    pool = PagePool(m.pool_config(num_pages=16, page_size=4))
    out = generate(m, [[256, 1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at]),
                   pool=pool)[0]
    assert out == greedy[:greedy.index(stop_at) + 1]
    assert pool.num_free_pages == 15
    with pytest.raises(ValueError, match="prompts"):
        generate(m, [[]])
