"""Tokenizers: a checkpoint's tokenizer.json or a GGUF vocabulary (through ``tokenizers``), or bytes.

All expose ``encode(text, add_special_tokens=True) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``bos_token_id``, ``eos_token_ids``, and for chat ``chat_template`` (a Jinja
source or None), ``template_origin`` (where it was read, for error messages), ``bos_token``,
``eos_token`` (the strings templates use) and ``special_token_ids``.

A GGUF file stores a byte-level BPE tokenizer as metadata (``tokenizer.ggml.tokens``, ``merges``,
``token_type``, ``pre``); ``gguf_tokenizer`` rebuilds it as a ``tokenizers`` BPE with the
pre-tokenizer that ``tokenizer.ggml.pre`` names (the splits llama.cpp applies for that name, in
``llama-vocab.cpp``). Tokens typed CONTROL become special tokens, USER_DEFINED ones added tokens.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Tok

CONTROL, USER_DEFINED = 3, 4        # llama.cpp token types (tokenizer.ggml.token_type)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2():
    """GPT-2's split regex, then bytes to the byte-level alphabet."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's regex for that name)
PRE_TOKENIZERS = {
    "default": _gpt2, "gpt2": _gpt2,
    # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    **{name: lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])
       for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: lambda: _split_then_bytes(_LLAMA3_SPLIT) for name in ("llama-bpe", "llama3", "llama-v3")},
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def _byte_level_chars() -> dict[str, int]:
    """char -> byte of the byte-level BPE alphabet (GPT-2's): the printable Latin-1 bytes stand
    for themselves, the other 68 bytes, in order, for the code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {chr(b): b for b in keep}
    others = (b for b in range(256) if chr(b) not in chars)
    chars.update((chr(256 + i), b) for i, b in enumerate(others))
    return chars


_BYTE_LEVEL = _byte_level_chars()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")     # SentencePiece's byte fallback


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (or the tokenizer.json it is read from). Special tokens (BOS) are
    added as the file's post-processor says, or as ``add_bos`` says for a GGUF vocabulary; they
    are skipped when decoding."""

    def __init__(self, path: str | Path | _Tok, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), *, add_bos: bool = False, chat_template: str | None = None,
                 template_origin: str = "", bos_token: str | None = None, eos_token: str | None = None) -> None:
        if isinstance(path, _Tok):
            self._tok = path
        else:
            path = Path(path)
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.is_file():
                raise FileNotFoundError(f"no tokenizer.json at {path}")
            self._tok = _Tok.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template, self.template_origin = chat_template, template_origin
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_token_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_token_id, *ids] if self.add_bos and add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (b"" for a special token), also when they are only
        part of a character, which ``decode`` turns into U+FFFD: a byte-level BPE token mapped
        back through its alphabet, or a SentencePiece byte piece ``<0xNN>``."""
        text = self.decode([token_id])
        piece = self._tok.id_to_token(int(token_id))
        if "\ufffd" not in text or piece is None:
            return text.encode("utf-8")
        if (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        if all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return text.encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256, EOS = 257, PAD = 258.

    For random models whose vocabulary is larger, an id >= 259 decodes as the byte ``id % 256``
    so that generated text is still printable. It has no chat template.
    """

    BOS, EOS, PAD = 256, 257, 258
    NUM_IDS = 259
    chat_template = None
    template_origin = ""
    bos_token = eos_token = None
    special_token_ids = frozenset((BOS, EOS, PAD))

    def __init__(self, vocab_size: int = NUM_IDS, add_bos: bool = True) -> None:
        if vocab_size < self.NUM_IDS:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {self.NUM_IDS}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if self.add_bos and add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i % 256 for i in map(int, ids) if not self.BOS <= i < self.NUM_IDS)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The byte one token stands for (b"" for BOS, EOS and PAD)."""
        return b"" if self.BOS <= token_id < self.NUM_IDS else bytes([token_id % 256])


# ---- a checkpoint folder ------------------------------------------------------------------------
def load_tokenizer(path: str | Path, vocab_size: int, bos_token_id: int | None,
                   eos_token_ids: Sequence[int]) -> Tokenizer:
    """The folder's tokenizer.json when present (with the chat template of chat_template.jinja or
    tokenizer_config.json), else bytes."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        return ByteTokenizer(max(vocab_size, ByteTokenizer.NUM_IDS))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template, origin = _folder_template(path, config)
    return HFTokenizer(file, bos_token_id, eos_token_ids, chat_template=template, template_origin=origin,
                       bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))


def _folder_template(path: Path, config: dict) -> tuple[str | None, str]:
    """(template, where it came from): chat_template.jinja, else tokenizer_config.json's
    ``chat_template`` (a string, or named templates of which "default" is taken)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), str(jinja)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    origin = f"{path / 'tokenizer_config.json'}: chat_template"
    return (template, origin) if isinstance(template, str) else (None, "")


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---- a GGUF vocabulary --------------------------------------------------------------------------
def gguf_tokenizer(meta: dict[str, Any], vocab_size: int, path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file's ``tokenizer.*`` metadata describes; bytes if it has none.
    ValueError names the file and field of what cannot be built."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return ByteTokenizer(max(vocab_size, ByteTokenizer.NUM_IDS))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF field 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE ('gpt2') "
                         f"vocabularies are supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: GGUF field 'tokenizer.ggml.pre' is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = _Tok(models.BPE(_byte_level_vocab(tokens, types), merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    template = meta.get("tokenizer.chat_template")
    return HFTokenizer(tok, bos, tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
                       add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                       chat_template=template if isinstance(template, str) else None,
                       template_origin=f"{path}: tokenizer.chat_template",
                       bos_token=_at(tokens, bos), eos_token=_at(tokens, eos))


def _byte_level_vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """token -> id for the BPE model. Regular tokens not written in the byte alphabet (some
    converters store raw UTF-8) are respelled in it; control and user-defined tokens keep their
    text, so the added tokens built from them find their own ids."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(piece for piece, _ in spell.pre_tokenize_str(t))
        vocab.setdefault(t, i)
    return vocab


def _at(tokens: list[str], i: int | None) -> str | None:
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None
