"""The pagemem command. ``pagemem run`` serves a synthetic workload and reports how the pool did.

With no flags it runs the built-in tiny model with a pool far smaller than the workload, so
preemption and swap are visible in seconds on a laptop CPU.

Errors: a user's mistake (a flag's value, a missing, unreadable or unwritable path, a model that
does not load, an optional dependency not installed, memory the machine lacks) prints one line,
``pagemem: error: ...``, on stderr and exits with 2, before the run where it can be known then.
Anything else, a broken invariant's RuntimeError above all, is raised with its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from pagemem.models.summary import format_summary, plot_timeline, summarize

DEFAULT_MODEL = "random:tiny"
DEMO_NUM_PAGES = 48   # default pool for the tiny model: about a quarter of the workload's peak need
DESCRIPTION = "pagemem: paged KV-cache memory management for LLM inference"
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, MemoryError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, unless the help states it already or the flag is
    required (it has none). A default of None is for the help to say in words."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        return text if "default" in text or action.required else super()._get_help_string(action)


def _subparser(**kwargs) -> Parser:
    kwargs.setdefault("formatter_class", HelpFormatter)
    return Parser(**kwargs)


def _ranged(kind, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False):
    """An argparse type: ``kind`` (int or float) within [lo, hi] (open ends as asked); floats finite
    unless ``allow_inf`` (NaN never)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and (math.isnan(value) or (math.isinf(value) and not allow_inf)):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low = lo is not None and (value <= lo if lo_open else value < lo)
        high = hi is not None and (value >= hi if hi_open else value > hi)
        if low or high:
            if hi is None:
                raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}")
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                                             f"got {text}")
        return value
    return parse


def _positive(kind, allow_inf: bool = False):
    """An argparse type: ``kind`` > 0 (floats finite unless ``allow_inf``)."""
    return _ranged(kind, 0, lo_open=True, allow_inf=allow_inf)


def _power_of_two(text: str) -> int:
    value = _positive(int)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {text}")
    return value


def SEED(text: str) -> int:
    """An argparse type: a seed, an int in [0, 2**64) as SamplingParams and LLM take."""
    value = _ranged(int, 0)(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be < 2**64, got {text}")
    return value


# Subcommands other than ``run``: module -> its ``add_parser(subparsers)``, which registers the
# command and sets ``func`` (a callable of the parsed args) as the parser's default.
SUBCOMMAND_MODULES: tuple[str, ...] = ("pagemem.models.chat_cli", "pagemem.models.sim_cli", "pagemem.models.serve_cli")


def add_engine_args(cmd: argparse.ArgumentParser) -> None:
    """The engine's flags (model, pool, scheduler), shared by ``run`` and ``serve``."""
    cmd.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, GGUF file or random:<preset>")
    cmd.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                     help="weights and pool (default: float16 on CUDA, float32 on the CPU; bfloat16 on CUDA only)")
    cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when usable")
    cmd.add_argument("--page-size", type=_power_of_two, default=16, help="tokens a page, a power of two")
    pool = cmd.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=_ranged(int, 2), default=None,
                      help=f"pool pages, NULL_PAGE included (default: {DEMO_NUM_PAGES} for the tiny model, else "
                           f"from memory: --gpu-memory-utilization on CUDA, 1 GiB on the CPU)")
    pool.add_argument("--gpu-memory-utilization", type=_ranged(float, 0, 1, lo_open=True), default=None,
                      help="share of free CUDA memory for the pool, in (0, 1] (default: 0.9 on CUDA; CUDA only)")
    cmd.add_argument("--swap-space", type=_ranged(float, 0), default=1.0,
                     help="GiB of host memory for swapped pages (0: none, then --preemption recompute)")
    cmd.add_argument("--max-num-seqs", type=_positive(int), default=256, help="sequences a step")
    cmd.add_argument("--max-num-batched-tokens", type=_positive(int), default=2048, help="tokens a step")
    cmd.add_argument("--admit-batch", type=_positive(int), default=1,
                     help="while requests run, admit new ones only when this many slots are free")
    cmd.add_argument("--preemption", choices=["swap", "recompute", "auto"], default="swap",
                     help="how a running request gives its pages up when the pool is full")
    cmd.add_argument("--eviction", choices=["lru", "fifo", "priority"], default="lru",
                     help="which cached prefix page is dropped first")
    cmd.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                     help="share the pages of common prompt prefixes (default: off; run: on for "
                          "--dataset prefix-repetition)")
    cmd.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="queue the next step before the sampled ids reach the host")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pagemem", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser)
    cmd = sub.add_parser("run", help="serve a synthetic workload and summarize the pool's work",
                         description="Serve a synthetic workload (greedy, fixed output lengths) and summarize "
                                     "the pool's work.")
    cmd.set_defaults(func=run)
    add_engine_args(cmd)
    cmd.add_argument("--num-prompts", type=_positive(int), default=128, help="requests")
    cmd.add_argument("--input-len", type=_positive(int), default=96, help="mean prompt tokens")
    cmd.add_argument("--output-len", type=_positive(int), default=64, help="mean output tokens")
    cmd.add_argument("--range-ratio", type=_ranged(float, 0, 1, hi_open=True), default=0.5,
                     help="lengths drawn from len*(1-r) .. len*(1+r), r in [0, 1)")
    cmd.add_argument("--dataset", choices=["random", "prefix-repetition"], default="random",
                     help="prefix-repetition: four shared prefixes, half of each prompt")
    cmd.add_argument("--seed", type=SEED, default=0, help="workload, random weights and unseeded requests")
    cmd.add_argument("--json", type=Path, default=None, help="write every summary figure here (default: none)")
    cmd.add_argument("--plot", type=Path, default=None,
                     help="image of pool occupancy and swap traffic, e.g. run.png (default: none; needs matplotlib)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from pagemem.models.sampling import SamplingParams

    check_output_path(args.json, "--json")
    check_plot_path(args.plot)
    llm = build_llm(args)
    check_lengths(args, llm.model.config.max_position_embeddings)
    prompts, out_lens = make_workload(args, llm.model.config.vocab_size, reserved=8)
    check_pages(args, llm, prompts, out_lens)
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


# ---- checks before the run ------------------------------------------------------------------
def check_device(device: str) -> str | None:
    """Refuse --device cuda where CUDA is unusable (ValueError saying why); else None when the
    run is on CUDA, or why it is on the CPU."""
    from pagemem.backend import cuda_unavailable_reason
    reason = cuda_unavailable_reason() if device != "cpu" else "--device cpu"
    if device == "cuda" and reason is not None:
        raise ValueError(f"--device cuda: {reason}")
    return reason


def read_chat_template(path: Path | None) -> str | None:
    """The text of the --chat-template file (None: the model's own template). FileNotFoundError
    or ValueError naming the flag when there is no such file or it is not UTF-8 text."""
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template: no file at {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--chat-template: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_engine_flags(args) -> None:
    """What the parser cannot see in the engine flags, checked before the model loads: CUDA asked
    for and missing, --gpu-memory-utilization off CUDA, --swap-space beyond the machine's memory
    or 0 under a swapping --preemption."""
    from pagemem.models.engine import check_swap_space
    reason = check_device(args.device)
    if args.gpu_memory_utilization is not None and reason is not None:
        raise ValueError(f"--gpu-memory-utilization sizes the pool from free CUDA memory, and this run is on "
                         f"the CPU ({reason}); give --num-pages instead")
    check_swap_space(args.swap_space, "--swap-space")
    if args.preemption != "recompute" and args.swap_space == 0:
        raise ValueError(f"--preemption {args.preemption} needs --swap-space > 0")


_FLAG_OF = re.compile(r"^(model|dtype|device|page_size|num_pages|gpu_memory_utilization|swap_space|"
                      r"max_num_seqs|max_num_batched_tokens|admit_batch|preemption|eviction|seed)\b")


def build_llm(args):
    """The LLM the engine flags describe (the tiny model gets the small demo pool). A refusal of
    an argument is reworded to name its flag."""
    from pagemem.models.engine import LLM
    check_engine_flags(args)
    num_pages = args.num_pages
    if num_pages is None and args.gpu_memory_utilization is None and args.model == DEFAULT_MODEL:
        num_pages = DEMO_NUM_PAGES
    prefix = args.enable_prefix_caching if args.enable_prefix_caching is not None else \
        getattr(args, "dataset", None) == "prefix-repetition"
    try:
        return LLM(args.model, dtype=args.dtype, device=args.device, page_size=args.page_size, num_pages=num_pages,
                   gpu_memory_utilization=args.gpu_memory_utilization or 0.9, swap_space=args.swap_space,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   preemption=args.preemption, eviction=args.eviction, enable_prefix_caching=prefix,
                   seed=args.seed, admit_batch=args.admit_batch, async_scheduling=args.async_scheduling)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise named_for_flags(e) from None


def named_for_flags(e: Exception) -> Exception:
    """The same error, a leading LLM argument name (``num_pages ...``) written as its flag."""
    return type(e)(_FLAG_OF.sub(lambda m: "--" + m.group(1).replace("_", "-"), str(e)))


def check_lengths(args, context: int) -> None:
    """The longest request --input-len, --output-len and --range-ratio allow must fit the context."""
    hi = 1.0 + args.range_ratio
    longest_in, longest_out = int(args.input_len * hi), int(args.output_len * hi)
    if longest_in + longest_out > context:
        raise ValueError(f"--input-len {args.input_len} and --output-len {args.output_len} with --range-ratio "
                         f"{args.range_ratio:g} allow requests of {longest_in} + {longest_out} tokens; the "
                         f"model's context is {context} tokens")


def check_pages(args, llm, prompts, out_lens) -> None:
    """The workload's largest request must fit the pool on its own."""
    ps, pool = llm.pool.page_size, llm.pool.num_pages - 1
    need, i = max((-(-(len(p) + n) // ps), i) for i, (p, n) in enumerate(zip(prompts, out_lens)))
    if need > pool:
        raise ValueError(f"request {i} ({len(prompts[i])} prompt + {out_lens[i]} output tokens) needs {need} pages "
                         f"of {ps} tokens; the pool has {pool} (--num-pages {pool + 1}): give more --num-pages, "
                         f"or shorter --input-len / --output-len")


def check_output_path(path: Path | None, flag: str) -> None:
    """``path`` can be written: not a folder, in a folder that exists, writable (tried by opening
    it to append, a new file removed again). ValueError naming ``flag`` otherwise."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    if not existed:
        path.unlink()


def check_plot_path(path: Path | None) -> None:
    """--plot: matplotlib installed, a format it writes, a writable path."""
    if path is None:
        return
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib (pip install 'pagemem[plot]'): {e}") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {path}: matplotlib writes {', '.join(sorted(formats))}, not {path.suffix}")
    check_output_path(path, "--plot")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand and return the exit status: 2 and one line on stderr for a flag the
    parser refuses or a user's mistake (USER_ERRORS; raised instead with PAGEMEM_DEBUG set),
    130 on Ctrl-C. Other errors propagate with their traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:             # --help (0) or a flag refused by the parser (2, one line)
        return e.code
    try:
        args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("PAGEMEM_DEBUG"):
            raise
        print(f"pagemem: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pagemem: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
