"""TextStream: one choice's text decoded as its tokens come, cut at the first stop string.

Decoding is incremental in the way of Hugging Face's text-generation-inference: each new token is
decoded together with the few tokens before it (from ``prefix`` up to ``read``, the tokens
already turned into text), and only what that window adds to the text of its older part is
new. Text that ends in U+FFFD (a character whose bytes have not all come) waits for the next
token. Stop strings are searched in the decoded text; what is ready to send holds back any tail
that could still become a stop string, so a streamed reply never shows text that the
non-streamed reply cuts away.
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Owns one choice's output ids (as given to ``add``) and the text decoded from them.

    ``text``: the decoded text so far, cut before the first stop string once one appears
    (``stopped``). ``ready()``: the part of ``text`` that no later token can change.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty str, got {list(stop)!r}")
        self._decode = decode
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = self._read = 0      # ids[prefix:read]: the window's part already in text
        self.text = ""
        self.stopped = False
        self.ended = False                 # flush() was called: no more ids will come

    def add(self, ids: Sequence[int]) -> None:
        """Take the next output ids; extend ``text`` by what they complete."""
        self._ids.extend(ids)
        if self.stopped or not ids:
            return
        old = self._decode(self._ids[self._prefix:self._read])
        new = self._decode(self._ids[self._prefix:])
        if len(new) > len(old) and not new.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            self._append(new[len(old):])

    def flush(self) -> None:
        """The choice has ended: take in what the last ids decode to, unfinished characters
        (U+FFFD) included, as a decode of all the ids would."""
        self.ended = True
        if self.stopped:
            return
        old = self._decode(self._ids[self._prefix:self._read])
        new = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        if len(new) > len(old):
            self._append(new[len(old):])

    def ready(self) -> str:
        """``text`` less a tail that could be the start of a stop string (all of it once stopped
        or ended)."""
        if self.stopped or self.ended or not self._stop:
            return self.text
        return self.text[:len(self.text) - _held(self.text, self._stop, self._longest)]

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest + 1)   # a stop string may begin in the old tail
        self.text += piece
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True


def _held(text: str, stop: tuple[str, ...], longest: int) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0
