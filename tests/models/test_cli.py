"""The pagemem CLI: the main job runs with no flags, its tokens are the greedy tokens of its
workload, and its figures agree with the engine's own counters."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from _oracle import assert_same_greedy, ours
from pagemem.models import engine
from pagemem.models.cli import build_parser, main, make_workload
from pagemem.models.generate import generate

SUMMARY_KEYS = {
    "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
    "peak_pages_used", "mean_kv_utilization", "pages_swapped_out", "pages_swapped_in", "bytes_swapped_out",
    "bytes_swapped_in", "swap_out_gb_per_s", "swap_in_gb_per_s", "preemptions_swap", "preemptions_recompute",
    "prefix_hit_rate",
}
# random:tiny's page: 2 layers x (K, V) x 16 tokens x 2 K/V heads x head_dim 16 x 4 bytes (float32)
TINY_PAGE_BYTES = 2 * 2 * 16 * 2 * 16 * 4


@pytest.fixture
def engines(monkeypatch):
    """Every LLM the CLI builds in this test, with each generate() call's (prompts, params, outputs)."""
    made = []

    class Recording(engine.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []
            made.append(self)

        def generate(self, prompts, params=None, **kwargs):
            outs = super().generate(prompts, params, **kwargs)
            self.calls.append((prompts, params, outs))
            return outs

    monkeypatch.setattr(engine, "LLM", Recording)
    return made


def test_run_with_no_flags_shows_the_pool_at_work():
    """The default run on the tiny model preempts and swaps: the printed counts say so."""
    proc = subprocess.run([sys.executable, "-m", "pagemem.models.cli", "run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    swaps = re.search(r"^preemptions +swap (\d+), recompute (\d+)$", proc.stdout, re.M)
    out = re.search(r"^swapped out +(\d+) pages", proc.stdout, re.M)
    back = re.search(r"^swapped in +(\d+) pages", proc.stdout, re.M)
    assert swaps and out and back, proc.stdout
    assert int(swaps[1]) > 0 and int(out[1]) > 0 and int(back[1]) == int(out[1])
    assert re.search(r"^requests +128 in ", proc.stdout, re.M)
    assert "requests: 100%" in proc.stderr            # the progress bar


def test_json_holds_every_summary_figure_and_plot_is_written(tmp_path, engines):
    path, png = tmp_path / "s.json", tmp_path / "p.png"
    assert main(["run", "--num-prompts", "24", "--json", str(path), "--plot", str(png), "--no-progress"]) == 0
    s = json.loads(path.read_text())
    (llm,) = engines
    assert SUMMARY_KEYS <= s.keys()
    assert s["num_requests"] == 24 and s["preemptions_swap"] > 0
    assert s["pages_swapped_out"] == llm.swap.num_pages_out > 0 and s["pages_swapped_in"] == llm.swap.num_pages_in
    assert s["page_bytes"] == TINY_PAGE_BYTES
    assert s["bytes_swapped_out"] == llm.swap.num_pages_out * TINY_PAGE_BYTES
    assert s["bytes_swapped_in"] == llm.swap.num_pages_in * TINY_PAGE_BYTES
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag", ["--async-scheduling", "--no-async-scheduling"])
def test_run_generates_the_workloads_greedy_tokens(tmp_path, engines, flag):
    """The run's outputs are the greedy tokens of its workload (pagemem.models.generate on the
    same prompts, compared with the near-tie rule of tests/models/_oracle.py), with async
    scheduling on and off; the flag reaches the engine."""
    argv = ["run", "--num-prompts", "24", "--no-progress", flag]
    assert main(argv) == 0
    (llm,) = engines
    assert llm.async_scheduling is (flag == "--async-scheduling")
    (prompts, params, outs), = llm.calls
    want_prompts, want_lens = make_workload(build_parser().parse_args(argv), llm.model.config.vocab_size, reserved=8)
    assert prompts == want_prompts and [p.max_tokens for p in params] == want_lens
    want = generate(llm.model, prompts, params)
    assert_same_greedy(ours(llm.model), prompts, [(o.token_ids, o.finish_reason) for o in outs],
                       [(w, "length") for w in want])
    assert llm.swap.num_pages_out > 0                    # under pressure: tokens survive swap


def test_prefix_repetition_dataset_hits_the_cache(tmp_path):
    path = tmp_path / "s.json"
    # A 64-token budget prefills the first prompt over two steps, so later prompts find its pages.
    assert main(["run", "--dataset", "prefix-repetition", "--num-prompts", "16", "--num-pages", "256",
                 "--max-num-batched-tokens", "64",
                 "--json", str(path), "--no-progress"]) == 0
    assert json.loads(path.read_text())["prefix_hit_rate"] > 0.2


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:nope"], "unknown preset 'nope'"),
    (["--model", "/no/such/folder"], "--model '/no/such/folder' is not a folder, nor a .gguf file"),
    (["--num-pages", "3", "--input-len", "200"], r"needs \d+ pages of 16 tokens; the pool has 2 \(--num-pages 3\)"),
    (["--input-len", "5000"], "--input-len 5000 and --output-len 64 with --range-ratio 0.5 allow requests of "
                              "7500 \\+ 96 tokens; the model's context is 4096 tokens"),
    (["--output-len", "90", "--input-len", "2700"], "--output-len 90 .* the model's context is 4096 tokens"),
])
def test_bad_input_is_a_message_and_exit_2(capsys, argv, message):
    """Each message names the flags the user gave (not max_tokens=, path_or_random:, ...)."""
    assert main(["run", "--no-progress", "--num-prompts", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"pagemem: error: .*{message}.*\n", err), err


@pytest.mark.parametrize("flag", ["--input-len=0", "--output-len=-3", "--num-prompts=0", "--page-size=x"])
def test_non_positive_lengths_rejected_by_the_parser(flag):
    proc = subprocess.run([sys.executable, "-m", "pagemem.models.cli", "run", flag], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pagemem run: error: argument")


def test_run_seed_reaches_the_workload_and_the_engine(engines):
    """--seed picks the workload's prompts and lengths and is the engine's seed: seed 7's prompts
    are make_workload's for seed 7, not the default seed 0's."""
    argv = ["run", "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--no-progress", "--seed", "7"]
    assert main(argv) == 0
    (llm,) = engines
    assert llm.seed == 7
    (prompts, params, _), = llm.calls
    vocab = llm.model.config.vocab_size
    want_prompts, want_lens = make_workload(build_parser().parse_args(argv), vocab, reserved=8)
    assert prompts == want_prompts and [p.max_tokens for p in params] == want_lens
    assert prompts != make_workload(build_parser().parse_args(argv[:-2]), vocab, reserved=8)[0]


@pytest.mark.parametrize("flags,cached", [
    ([], False),
    (["--enable-prefix-caching"], True),
    (["--dataset", "prefix-repetition"], True),
    (["--dataset", "prefix-repetition", "--no-enable-prefix-caching"], False),
])
def test_run_prefix_caching_flag_reaches_the_engine(engines, flags, cached):
    """--enable-prefix-caching / --no-enable-prefix-caching decide the engine's prefix cache; by
    default it is on for the prefix-repetition dataset only."""
    argv = ["run", "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--no-progress", *flags]
    assert main(argv) == 0
    (llm,) = engines
    assert (llm.prefix_cache is not None) is cached


@pytest.mark.parametrize("flag,value,kwarg,want", [
    ("--dtype", "float32", "dtype", "float32"), ("--device", "cpu", "device", "cpu"),
    ("--swap-space", "0.5", "swap_space", 0.5), ("--max-num-seqs", "3", "max_num_seqs", 3),
    ("--admit-batch", "2", "admit_batch", 2), ("--preemption", "recompute", "preemption", "recompute"),
    ("--eviction", "fifo", "eviction", "fifo"), ("--seed", "9", "seed", 9),
])
def test_engine_flags_reach_the_engine(monkeypatch, flag, value, kwarg, want):
    """Each engine flag's value is the engine's argument (and not its default)."""
    seen = []

    class Recording(engine.LLM):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "LLM", Recording)
    base = ["run", "--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--no-progress"]
    assert main(base + [flag, value]) == 0 and main(base) == 0
    assert seen[0][kwarg] == want != seen[1][kwarg]


def test_range_ratio_zero_gives_every_request_the_same_lengths(engines):
    assert main(["run", "--num-prompts", "6", "--input-len", "8", "--output-len", "3", "--range-ratio", "0",
                 "--no-progress"]) == 0
    (prompts, params, _), = engines[0].calls
    assert {len(p) for p in prompts} == {8} and {p.max_tokens for p in params} == {3}
