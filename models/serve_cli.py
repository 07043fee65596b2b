"""``pagemem serve``: an OpenAI-compatible HTTP server over one engine (the ``serve`` extra).

    pagemem serve --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8000
    pagemem serve --model random:llama-3.2-1b --num-pages 4096 --max-waiting 512

The engine flags are those of ``pagemem run``. ``--port 0`` takes a free port; the line
``pagemem serve: <model> listening on http://HOST:PORT`` is printed once the socket listens.
Endpoints and error bodies: see ``pagemem.models.server``.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from pagemem.models.cli import SEED, _positive, _ranged, add_engine_args, build_llm, read_chat_template

LISTENING = "listening on http://"


def add_parser(subparsers) -> None:
    """Register ``serve`` on the ``pagemem`` parser's subcommands."""
    cmd = subparsers.add_parser("serve", help="serve OpenAI's completions and chat completions over HTTP")
    cmd.set_defaults(func=run_serve)
    add_engine_args(cmd)
    cmd.add_argument("--seed", type=SEED, default=0, help="random weights and unseeded requests")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    cmd.add_argument("--port", type=_ranged(int, 0, 65535), default=8000, help="0: any free port (printed)")
    cmd.add_argument("--max-waiting", type=_positive(int), default=1024,
                     help="requests the waiting queue holds; past it a call gets 503 with Retry-After")
    cmd.add_argument("--max-model-len", type=_positive(int), default=None,
                     help="longest prompt + reply, in tokens (default: the model's context)")
    cmd.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    cmd.add_argument("--chat-template", type=Path, default=None,
                     help="a Jinja file used instead of the model's template (default: the model's)")
    cmd.add_argument("--access-log", action="store_true", help="log every HTTP request")
    cmd.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                     help="the server's log level")
    cmd.add_argument("--debug-endpoints", action="store_true", help=argparse.SUPPRESS)   # GET /debug/pool (tests)


def run_serve(args: argparse.Namespace) -> None:
    """Load the model, warm it up, bind the socket and serve until interrupted."""
    try:
        import uvicorn
        from pagemem.models.server import ServerConfig, create_app
        from pagemem.models.server_engine import EngineLoop
        from pagemem.models.server_protocol import Limits
    except ImportError as e:
        raise ImportError(f"pagemem serve needs the serve extra (pip install 'pagemem[serve]'): {e}") from None
    template = read_chat_template(args.chat_template)
    llm = build_llm(args)
    context = llm.model.config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > context:
        raise ValueError(f"--max-model-len {args.max_model_len} exceeds the model's context of {context} tokens")
    limits = Limits(args.max_model_len or context, (llm.pool.num_pages - 1) * llm.pool.page_size)
    llm.warmup(min(limits))                 # GPU: compile and capture before the first request
    name = args.served_model_name or args.model
    app = create_app(EngineLoop(llm, max_waiting=args.max_waiting),
                     ServerConfig(name, limits, template, debug=args.debug_endpoints))
    ipv6 = ":" in args.host
    sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ipv6 else socket.AF_INET)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ipv6 else host
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=5)
    print(f"pagemem serve: {name} {LISTENING}{host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    from pagemem.models.cli import main
    sys.exit(main(["serve", *sys.argv[1:]]))
