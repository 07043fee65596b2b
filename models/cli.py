"""The ``pagemem`` command. ``pagemem run`` serves a synthetic workload and reports how the pool did.

With no flags it runs the built-in tiny model with a pool far smaller than the workload, so
preemption and swap are visible in seconds on a laptop CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from pagemem.models.summary import format_summary, plot_timeline, summarize

DEFAULT_MODEL = "random:tiny"
DEMO_NUM_PAGES = 48   # default pool for the tiny model: about a quarter of the workload's peak need


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


# Subcommands other than ``run``: module -> its ``add_parser(subparsers)``, which registers the
# command and sets ``func`` (a callable of the parsed args) as the parser's default.
SUBCOMMAND_MODULES: tuple[str, ...] = ("pagemem.models.chat_cli", "pagemem.models.sim_cli", "pagemem.models.serve_cli")


def add_engine_args(cmd: argparse.ArgumentParser) -> None:
    """The engine's flags (model, pool, scheduler), shared by ``run`` and ``serve``."""
    cmd.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, GGUF file or random:<preset> (default: %(default)s)")
    cmd.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    cmd.add_argument("--page-size", type=_positive(int), default=16)
    pool = cmd.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=_positive(int), default=None,
                      help=f"pool pages (default: {DEMO_NUM_PAGES} for the tiny model, else from memory)")
    pool.add_argument("--gpu-memory-utilization", type=_positive(float), default=None)
    cmd.add_argument("--swap-space", type=float, default=1.0, help="GiB of host memory for swapped pages")
    cmd.add_argument("--max-num-seqs", type=_positive(int), default=256)
    cmd.add_argument("--max-num-batched-tokens", type=_positive(int), default=2048)
    cmd.add_argument("--admit-batch", type=_positive(int), default=1,
                     help="while requests run, admit new ones only when this many slots are free")
    cmd.add_argument("--preemption", choices=["swap", "recompute", "auto"], default="swap")
    cmd.add_argument("--eviction", choices=["lru", "fifo", "priority"], default="lru")
    cmd.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                     help="default: on for --dataset prefix-repetition")
    cmd.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="queue the next step before the sampled ids reach the host (default: on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagemem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="serve a synthetic workload and summarize the pool's work")
    cmd.set_defaults(func=run)
    add_engine_args(cmd)
    cmd.add_argument("--num-prompts", type=_positive(int), default=128)
    cmd.add_argument("--input-len", type=_positive(int), default=96)
    cmd.add_argument("--output-len", type=_positive(int), default=64)
    cmd.add_argument("--range-ratio", type=float, default=0.5, help="lengths drawn from len*(1-r) .. len*(1+r)")
    cmd.add_argument("--dataset", choices=["random", "prefix-repetition"], default="random")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--json", type=Path, default=None, help="write every summary figure here")
    cmd.add_argument("--plot", type=Path, default=None, help="PNG of pool occupancy and swap traffic")
    cmd.add_argument("--no-progress", action="store_true")
    import importlib
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def make_workload(args, vocab_size: int, reserved: int) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids) and output lengths, seeded. Ids avoid the top ``reserved`` specials."""
    rng = np.random.default_rng(args.seed)
    lo, hi = 1.0 - args.range_ratio, 1.0 + args.range_ratio
    in_lens = np.maximum(1, rng.integers(int(args.input_len * lo), int(args.input_len * hi) + 1, args.num_prompts))
    out_lens = np.maximum(1, rng.integers(int(args.output_len * lo), int(args.output_len * hi) + 1, args.num_prompts))
    top = max(2, min(vocab_size - reserved, 32_000))
    if args.dataset == "random":
        prompts = [rng.integers(0, top, n).tolist() for n in in_lens]
    else:  # prefix-repetition: 4 shared prefixes (half of each prompt, at most), random suffixes
        prefixes = [rng.integers(0, top, args.input_len // 2).tolist() for _ in range(4)]
        prompts = []
        for i, n in enumerate(in_lens):
            shared = prefixes[i % 4][:n // 2]
            prompts.append(shared + rng.integers(0, top, n - len(shared)).tolist())
    return prompts, out_lens.tolist()


def run(args) -> dict:
    from pagemem.models.engine import LLM
    from pagemem.models.sampling import SamplingParams

    if not 0 <= args.range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    num_pages = args.num_pages
    if num_pages is None and args.gpu_memory_utilization is None and args.model == DEFAULT_MODEL:
        num_pages = DEMO_NUM_PAGES
    prefix = args.enable_prefix_caching if args.enable_prefix_caching is not None else args.dataset == "prefix-repetition"
    llm = LLM(args.model, dtype=args.dtype, device=args.device, page_size=args.page_size, num_pages=num_pages,
              gpu_memory_utilization=args.gpu_memory_utilization or 0.9, swap_space=args.swap_space,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              preemption=args.preemption, eviction=args.eviction, enable_prefix_caching=prefix, seed=args.seed,
              admit_batch=args.admit_batch, async_scheduling=args.async_scheduling)
    prompts, out_lens = make_workload(args, llm.model.config.vocab_size, reserved=8)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.warmup(max(map(len, prompts)) + max(out_lens))   # GPU: compile and capture before the clock starts
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    summary = summarize(llm, outputs)
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot is not None:
        plot_timeline(llm, args.plot)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as e:
        if os.environ.get("PAGEMEM_DEBUG"):
            raise
        print(f"pagemem: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
