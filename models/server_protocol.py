"""The OpenAI request bodies ``pagemem serve`` accepts, and their translation into engine requests.

Bodies are validated strictly (pydantic, ``extra="forbid"``): a field the server does not know, a
value of the wrong type or out of range, or a setting it cannot honour (``echo``, ``suffix``,
penalties, ``logit_bias``, ``best_of`` != ``n``) is an APIError of status 400 naming the field, in
OpenAI's error body. Extensions follow vLLM's names: ``top_k`` (-1 or 0 disable it), ``min_p``,
``stop_token_ids``, ``ignore_eos``, ``return_token_ids`` (each choice carries its token ids, each
stream chunk its new ones) and ``return_tokens_as_token_ids`` (logprob tokens as "token_id:N").

Seeds: choice 0 of a call with ``seed`` s draws with s itself, so it repeats a call with n=1;
choice i > 0 draws with a seed mixed from s and i.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pagemem.models.chat import chat_prompt, conversations
from pagemem.models.sampling import SEED_LIMIT, SamplingParams, request_seed
from pagemem.models.server_engine import ChoiceSpec

MAX_LOGPROBS = 20
MAX_N = 128
_UNSEEDED = SamplingParams()


class APIError(Exception):
    """An HTTP error in OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Limits(NamedTuple):
    """What the served engine can hold: tokens of one sequence (context), and of the pool."""

    max_model_len: int
    pool_tokens: int


def parse(kind: type[BaseModel], body: Any) -> BaseModel:
    """``body`` (decoded JSON) as a ``kind``, or an APIError 400 naming the first bad field.
    A field given as null takes its default."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif param == "prompt":
            message = "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        elif param is None:
            message = f"the body must be a JSON object: {err['msg']}"
        else:
            message = f"{'.'.join(loc)}: {err['msg']}"
        raise APIError(400, message, param=param) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: BaseModel) -> None:
    checks = [("presence_penalty", req.presence_penalty == 0.0), ("frequency_penalty", req.frequency_penalty == 0.0),
              ("logit_bias", not req.logit_bias)]
    if isinstance(req, CompletionRequest):
        checks += [("echo", not req.echo), ("suffix", req.suffix is None),
                   ("best_of", req.best_of is None or req.best_of == req.n)]
    for name, ok in checks:
        if not ok:
            raise APIError(400, f"{name}: this server does not support a value other than the default", param=name)
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(not s for s in stops):
        raise APIError(400, "stop: stop strings must not be empty", param="stop")
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise APIError(400, "stop_token_ids: token ids must be >= 0", param="stop_token_ids")


def stop_strings(req: _Common) -> tuple[str, ...]:
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())


def sampling_params(req: _Common, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
    """The engine's SamplingParams of one choice; APIError 400 for what it refuses."""
    try:
        return SamplingParams(temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                              min_p=req.min_p, max_tokens=max_tokens, stop_token_ids=tuple(req.stop_token_ids or ()),
                              seed=seed, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except (TypeError, ValueError) as e:
        field = re.match(r"SamplingParams\.(\w+)", str(e))
        raise APIError(400, str(e).replace("SamplingParams.", ""), param=field and field.group(1)) from None


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice ``i``'s seed: ``seed`` itself for choice 0, mixed from it and ``i`` after."""
    if seed is None or i == 0:
        return seed
    return request_seed(_UNSEEDED, seed, i)


def completion_specs(req: CompletionRequest, tokenizer, limits: Limits) -> tuple[list[ChoiceSpec], int]:
    """(one ChoiceSpec per choice, prompt by prompt then n each; total prompt tokens)."""
    prompts = _prompt_list(req.prompt)
    specs, num_prompt = [], 0
    for p in prompts:
        try:
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        except (TypeError, ValueError) as e:        # e.g. a lone surrogate, which UTF-8 cannot encode
            raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
        if not ids:
            raise APIError(400, "prompt is empty (no tokens)", param="prompt")
        _check_context(len(ids), req.max_tokens, limits, "prompt")
        num_prompt += len(ids)
        for i in range(req.n):
            params = sampling_params(req, req.max_tokens, req.logprobs, choice_seed(req.seed, i))
            specs.append(ChoiceSpec(ids, params, stop_strings(req)))
    return specs, num_prompt


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


def chat_specs(req: ChatRequest, model, limits: Limits, chat_template: str | None) -> tuple[list[ChoiceSpec], int]:
    """(one ChoiceSpec per choice; prompt tokens) for the conversation through the chat template.
    Without ``max_tokens`` a reply may fill the context (and the pool) after its prompt."""
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    conv = _conversation(req.messages)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    asked = req.max_completion_tokens or req.max_tokens
    base = sampling_params(req, asked or 1, logprobs, None)
    try:
        ids, base = chat_prompt(model, conv, base, chat_template=chat_template)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = asked or min(limits.max_model_len, limits.pool_tokens) - len(ids)
    _check_context(len(ids), max(max_tokens, 1), limits, "messages")
    if max_tokens < 1:
        raise APIError(400, f"the prompt's {len(ids)} tokens leave no room for a reply in the pool "
                            f"({limits.pool_tokens} tokens)", param="messages")
    specs = [ChoiceSpec(ids, replace(base, max_tokens=max_tokens, seed=choice_seed(req.seed, i)), stop_strings(req))
             for i in range(req.n)]
    return specs, len(ids)


def _conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with OpenAI's content parts ([{"type": "text", "text": ...}]) joined into text."""
    try:
        conv = conversations(messages)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), param="messages") from None
    if len(conv) != 1:
        raise APIError(400, "messages must be one conversation: a list of {'role', 'content'} dicts", param="messages")
    out = []
    for j, m in enumerate(conv[0]):
        content = m["content"]
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise APIError(400, f"messages[{j}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{j}].content must be a string or a list of text parts", param="messages")
        out.append({**m, "content": content or ""})
    return out


def _check_context(num_prompt: int, max_tokens: int, limits: Limits, param: str) -> None:
    if num_prompt + max_tokens <= limits.max_model_len:
        return
    where = param if num_prompt >= limits.max_model_len else "max_tokens"
    raise APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
                        f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {param}, {max_tokens} in the "
                        f"completion). Please reduce the length of the {param} or completion.",
                   param=where, code="context_length_exceeded")


def stream_usage(req: _Common) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)
