"""Tokenizers: a checkpoint's tokenizer.json (through the ``tokenizers`` library), or bytes.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_token_id`` and ``eos_token_ids``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """tokenizer.json through ``tokenizers``; special tokens (BOS) are added as the file's
    post-processor says, and skipped when decoding."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = ()) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = _Tok.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256, EOS = 257, PAD = 258.

    For random models whose vocabulary is larger, an id >= 259 decodes as the byte ``id % 256``
    so that generated text is still printable.
    """

    BOS, EOS, PAD = 256, 257, 258
    NUM_IDS = 259

    def __init__(self, vocab_size: int = NUM_IDS, add_bos: bool = True) -> None:
        if vocab_size < self.NUM_IDS:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {self.NUM_IDS}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.bos_token_id = self.BOS
        self.eos_token_ids = (self.EOS,)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i % 256 for i in map(int, ids) if not self.BOS <= i < self.NUM_IDS)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(path: str | Path, vocab_size: int, bos_token_id: int | None,
                   eos_token_ids: Sequence[int]) -> Tokenizer:
    """The checkpoint's tokenizer.json when present, else bytes (with a note in the type)."""
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        return HFTokenizer(file, bos_token_id, eos_token_ids)
    return ByteTokenizer(max(vocab_size, ByteTokenizer.NUM_IDS))
