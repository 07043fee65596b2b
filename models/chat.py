"""Chat: a checkpoint's chat template rendered with Jinja as transformers renders it, and ``chat``.

The template (``tokenizer.chat_template`` of a GGUF file, ``chat_template.jinja`` or
``tokenizer_config.json`` in a folder) is compiled in Jinja's immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}``
block that renders its body, the globals ``raise_exception`` and ``strftime_now`` and a
``tojson`` filter that does not escape HTML, and rendered with ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``: the environment and arguments of
transformers' ``apply_chat_template``. The rendered text is tokenized without adding special
tokens (the template writes them).

A reply stops on the model's EOS ids and on the template's end-of-turn token: the special token
the template writes right after an assistant message (``<|im_end|>`` for ChatML, ``<|eot_id|>``
for Llama 3), found by rendering a probe conversation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagemem.models.sampling import SamplingParams

Conversation = Sequence[Mapping[str, Any]]
_PROBE = "\x00pagemem-end-of-turn-probe\x00"


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source). jinja2.TemplateSyntaxError if it does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(tokenizer, conversation: Conversation, *, chat_template: str | None = None,
                add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The prompt text of one conversation through ``chat_template`` (default: the tokenizer's).
    ValueError naming the template's origin when there is none or it fails to render."""
    source, origin = _template(tokenizer, chat_template)
    context = {"bos_token": getattr(tokenizer, "bos_token", None), "eos_token": getattr(tokenizer, "eos_token", None)}
    try:
        return compile_template(source).render(messages=[dict(m) for m in conversation],
                                               add_generation_prompt=add_generation_prompt, **context, **kwargs)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ValueError(f"chat template {origin} failed to render{line}: {type(e).__name__}: {e}") from None


def _template(tokenizer, chat_template: str | None) -> tuple[str, str]:
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a str (a Jinja template), got {type(chat_template).__name__}")
        return chat_template, "chat_template=..."
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise ValueError("the model has no chat template (none in its checkpoint); give one: chat_template= (--chat-template FILE)")
    return source, getattr(tokenizer, "template_origin", "") or "of the model"


def end_of_turn_ids(tokenizer, chat_template: str | None = None) -> tuple[int, ...]:
    """The special token the template writes right after an assistant message, as a 1-tuple;
    () when the template writes none there (or refuses the probe conversation)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(tokenizer, probe, chat_template=chat_template, add_generation_prompt=False)
    except ValueError:          # e.g. a template that insists on a system turn: no end-of-turn found
        return ()
    if _PROBE not in text:
        return ()
    after = tokenizer.encode(text.split(_PROBE, 1)[1], add_special_tokens=False)
    special = getattr(tokenizer, "special_token_ids", frozenset())
    return (after[0],) if after and after[0] in special else ()


def conversations(messages) -> list[list[dict[str, Any]]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them -> a list of them.
    TypeError/ValueError naming ``messages`` for anything else."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
    convs = [messages] if isinstance(messages[0], Mapping) else list(messages)
    for i, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"messages[{i}] must be a non-empty list of {{'role', 'content'}} dicts")
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
                raise TypeError(f"messages: message {j} of conversation {i} must be a dict with a str 'role' "
                                f"and a 'content', got {m!r}")
    return [[dict(m) for m in conv] for conv in convs]


def chat_prompt(model, conversation: Conversation, params: SamplingParams | None = None, *,
                chat_template: str | None = None, add_generation_prompt: bool = True
                ) -> tuple[list[int], SamplingParams]:
    """(prompt token ids, params) for one conversation: the rendered template, tokenized, and
    ``params`` (default ``SamplingParams()``) whose stop ids gain the template's
    end-of-turn token and the model's EOS ids (unless ``ignore_eos``)."""
    text = render_chat(model.tokenizer, conversation, chat_template=chat_template,
                       add_generation_prompt=add_generation_prompt)
    return model.tokenizer.encode(text, add_special_tokens=False), _with_stops(model, params, chat_template)


def _with_stops(model, params: SamplingParams | None, chat_template: str | None) -> SamplingParams:
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if params.ignore_eos:
        return params
    extra = end_of_turn_ids(model.tokenizer, chat_template) + tuple(model.eos_token_ids)
    stops = tuple(dict.fromkeys(params.stop_token_ids + extra))
    return dataclasses.replace(params, stop_token_ids=stops)


def chat(llm, messages, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
         use_tqdm: bool = False, chat_template: str | None = None, add_generation_prompt: bool = True):
    """Reply to one conversation or to each of a list of conversations (vLLM's ``LLM.chat``):
    render each through the chat template, generate with ``llm.generate``, and return its
    RequestOutputs in order. ``params`` is one SamplingParams for all or one per conversation.
    All conversations are checked and rendered before any is queued."""
    convs = conversations(messages)
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(convs)
    if len(plist) != len(convs):
        raise ValueError(f"{len(plist)} SamplingParams for {len(convs)} conversations")
    pairs = [chat_prompt(llm.model, c, p, chat_template=chat_template, add_generation_prompt=add_generation_prompt)
             for c, p in zip(convs, plist)]
    return llm.generate([ids for ids, _ in pairs], [p for _, p in pairs], use_tqdm=use_tqdm)
