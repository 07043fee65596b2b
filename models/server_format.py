"""OpenAI's response bodies and stream chunks, built from an engine call's Deltas.

A Reply gathers the Deltas of one call (owned by the coroutine serving it): the text of each
choice is the concatenation of its Deltas' text, whether the call streams or not, so a stream
and a plain response of the same greedy request carry the same text. Log-probabilities reach
the server when a choice ends (``LLM.pop_output``), so a stream carries them all on the choice's
last chunk.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Sequence

from pagemem.models.engine import TokenLogprobs
from pagemem.models.server_engine import Delta


class Reply:
    """The choices of one call as their Deltas come. ``kind`` is "completion" or "chat"."""

    def __init__(self, kind: str, num_choices: int, num_prompt_tokens: int, model: str, tokenizer, *,
                 return_token_ids: bool = False, tokens_as_ids: bool = False) -> None:
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.num_prompt_tokens = num_prompt_tokens
        self.return_token_ids, self.tokens_as_ids = return_token_ids, tokens_as_ids
        self.texts: list[list[str]] = [[] for _ in range(num_choices)]
        self.token_ids: list[list[int]] = [[] for _ in range(num_choices)]
        self.finish: list[str | None] = [None] * num_choices
        self.logprobs: list[Sequence[TokenLogprobs] | None] = [None] * num_choices
        self.num_open = num_choices

    def add(self, d: Delta) -> None:
        self.texts[d.index].append(d.text)
        self.token_ids[d.index].extend(d.token_ids)
        if d.logprobs is not None:
            self.logprobs[d.index] = d.logprobs
        if d.finish_reason is not None:
            self.finish[d.index] = d.finish_reason
            self.num_open -= 1

    def usage(self) -> dict[str, int]:
        out = sum(map(len, self.token_ids))
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": out,
                "total_tokens": self.num_prompt_tokens + out}

    # ---- plain responses --------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        choices = [self._choice(i) for i in range(len(self.texts))]
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _choice(self, i: int) -> dict[str, Any]:
        text = "".join(self.texts[i])
        body = {"index": i}
        if self.kind == "completion":
            body["text"] = text
        else:
            body["message"] = {"role": "assistant", "content": text}
        body["logprobs"] = self._logprobs(self.logprobs[i])
        body["finish_reason"] = self.finish[i]
        if self.return_token_ids:
            body["token_ids"] = self.token_ids[i]
        return body

    # ---- streams ----------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        """Chunks before any token: chat streams announce the assistant role of each choice."""
        if self.kind == "completion":
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(len(self.texts))]

    def chunk(self, d: Delta) -> dict[str, Any] | None:
        """The stream chunk of ``d``; None when it carries nothing the client asked for."""
        if not d.text and d.finish_reason is None and not (self.return_token_ids and d.token_ids):
            return None
        body: dict[str, Any] = {"index": d.index}
        if self.kind == "completion":
            body["text"] = d.text
        else:
            body["delta"] = {"content": d.text} if d.text else {}
        body["logprobs"] = self._logprobs(d.logprobs)
        body["finish_reason"] = d.finish_reason
        if self.return_token_ids:
            body["token_ids"] = list(d.token_ids)
        return self._chunk(body)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk(None), "choices": [], "usage": self.usage()}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [] if choice is None else [choice]}

    # ---- log-probabilities ------------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.tokens_as_ids else self.tokenizer.decode([token_id])

    def _logprobs(self, lps: Sequence[TokenLogprobs] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        if self.kind == "completion":
            tokens = [self._token(t.token_id) for t in lps]
            offsets, at = [], 0
            for t in lps:
                offsets.append(at)
                at += len(self.tokenizer.decode([t.token_id]))
            return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
                    "top_logprobs": [{self._token(i): lp for i, lp in t.top} for t in lps], "text_offset": offsets}
        return {"content": [{**self._entry(t.token_id, t.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in t.top]} for t in lps]}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        """A chat logprob entry; ``bytes`` are the token's own (a token that is part of a
        character decodes to U+FFFD, and its bytes are how a client puts the character together)."""
        return {"token": self._token(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id))}


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
