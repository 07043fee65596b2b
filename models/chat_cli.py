"""``pagemem chat``: talk to a model from the terminal; the reply is printed as its tokens come.

    pagemem chat --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?"

With ``--prompt`` it answers that one user message. Without it, each line of standard input is a
user turn of one conversation (the replies are kept in it), until the input ends. The prompt
goes through the model's chat template (or ``--chat-template FILE``), and a reply stops on the
template's end-of-turn token, the model's EOS, or ``--max-tokens``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from pagemem.models.chat import chat_prompt
from pagemem.models.cli import _positive, check_device, named_for_flags, read_chat_template


def add_parser(subparsers) -> None:
    """Register ``chat`` on the ``pagemem`` parser's subcommands."""
    cmd = subparsers.add_parser("chat", help="reply to a chat message (or to each line of stdin), streaming tokens")
    cmd.set_defaults(func=run_chat)
    cmd.add_argument("--model", required=True, help="a .gguf file, a checkpoint folder, or random:<preset>")
    cmd.add_argument("--prompt", default=None,
                     help="the user message (default: none; each line of stdin is a turn)")
    cmd.add_argument("--system", default=None, help="a system message to start the conversation with (default: none)")
    cmd.add_argument("--chat-template", type=Path, default=None,
                     help="a Jinja file used instead of the model's template (default: the model's)")
    cmd.add_argument("--max-tokens", type=_positive(int), default=256, help="most tokens a reply")
    cmd.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    cmd.add_argument("--top-p", type=float, default=1.0,
                     help="sample from the likeliest tokens whose probabilities add up to this, in (0, 1]; 1: all")
    cmd.add_argument("--top-k", type=int, default=0, help="sample from this many likeliest tokens; 0: all")
    cmd.add_argument("--seed", type=int, default=None,
                     help="the sampling's seed (default: none; each reply gets one from the engine's seed 0 and "
                          "the reply's number, the same on every run)")
    cmd.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                     help="weights and pool (default: float16 on CUDA, float32 on the CPU; bfloat16 on CUDA only)")
    cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when usable")
    cmd.add_argument("--num-pages", type=_positive(int), default=None,
                     help="pool pages, NULL_PAGE included (default: from memory: 0.9 of the free CUDA memory "
                          "on CUDA, 1 GiB on the CPU)")


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> list[str]:
    """Answer ``--prompt`` or each line of ``stdin``; print the replies to ``out``; return them."""
    from pagemem.models.engine import LLM
    from pagemem.models.sampling import SamplingParams

    stdin, out = stdin or sys.stdin, out or sys.stdout
    template = read_chat_template(args.chat_template)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    check_device(args.device)
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device, num_pages=args.num_pages,
                  preemption="recompute", swap_space=0)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise named_for_flags(e) from None
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else _lines(stdin, out)
    replies = []
    for text in turns:
        conversation.append({"role": "user", "content": text})
        reply = stream_reply(llm, conversation, params, out, chat_template=template)
        conversation.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def stream_reply(llm, conversation: list[dict], params, out: TextIO, *, chat_template: str | None = None) -> str:
    """Queue the conversation's reply on ``llm`` and run steps until it is done, writing the text
    decoded so far to ``out`` after each step. Text that ends inside a UTF-8 character (decoded
    as U+FFFD) waits for the rest of its bytes. Returns the reply's text."""
    ids, params = chat_prompt(llm.model, conversation, params, chat_template=chat_template)
    req = llm.add_request(ids, params)
    decode = llm.model.tokenizer.decode
    printed = ""
    while llm.has_unfinished():
        llm.step()
        text = decode(req.token_ids[req.num_prompt_tokens:])
        if not text.endswith("\ufffd"):
            printed = _write_new(out, printed, text)
    reply = llm.pop_output(req).text       # the engine forgets the request
    _write_new(out, printed, reply)
    out.write("\n")
    out.flush()
    return reply


def _write_new(out: TextIO, printed: str, text: str) -> str:
    """Write what ``text`` adds to what is on screen (``printed``); returns the screen's text.
    (A byte-level decode only grows at the end; were an earlier character to change, the
    screen keeps what it shows.)"""
    if not text.startswith(printed):
        return printed
    out.write(text[len(printed):])
    out.flush()
    return text


def _lines(stdin: TextIO, out: TextIO):
    """Non-empty lines of ``stdin`` (a ``> `` prompt on an interactive terminal)."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")
