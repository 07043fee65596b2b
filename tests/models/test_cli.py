"""The pagemem CLI: the main job runs with no flags; bad input exits non-zero with a message."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagemem.models.cli import main

SUMMARY_KEYS = {
    "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
    "peak_pages_used", "mean_kv_utilization", "pages_swapped_out", "pages_swapped_in", "bytes_swapped_out",
    "bytes_swapped_in", "swap_out_gb_per_s", "swap_in_gb_per_s", "preemptions_swap", "preemptions_recompute",
    "prefix_hit_rate",
}


def test_run_with_no_flags_shows_the_pool_at_work():
    proc = subprocess.run([sys.executable, "-m", "pagemem.models.cli", "run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output tokens/s" in proc.stdout and "preemptions" in proc.stdout
    assert "requests: 100%" in proc.stderr            # the progress bar


def test_json_holds_every_summary_figure_and_plot_is_written(tmp_path):
    path, png = tmp_path / "s.json", tmp_path / "p.png"
    assert main(["run", "--num-prompts", "24", "--json", str(path), "--plot", str(png), "--no-progress"]) == 0
    s = json.loads(path.read_text())
    assert SUMMARY_KEYS <= s.keys()
    assert s["num_requests"] == 24 and s["preemptions_swap"] > 0 and s["pages_swapped_out"] > 0
    assert s["bytes_swapped_out"] == s["pages_swapped_out"] * s["page_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_async_scheduling_gives_the_same_tokens_and_swaps(tmp_path):
    """--no-async-scheduling reaches the engine; the default run still completes and swaps with it
    (token identity between the two modes is checked in tests/models/test_engine.py)."""
    runs = {}
    for flag in ("--async-scheduling", "--no-async-scheduling"):
        path = tmp_path / f"{flag}.json"
        assert main(["run", "--num-prompts", "24", "--json", str(path), "--no-progress", flag]) == 0
        runs[flag] = json.loads(path.read_text())
    a, b = runs["--async-scheduling"], runs["--no-async-scheduling"]
    assert a["config"]["async_scheduling"] is True and b["config"]["async_scheduling"] is False
    assert a["output_tokens"] == b["output_tokens"] and a["pages_swapped_out"] > 0 and b["pages_swapped_out"] > 0


def test_prefix_repetition_dataset_hits_the_cache(tmp_path):
    path = tmp_path / "s.json"
    # A 64-token budget prefills the first prompt over two steps, so later prompts find its pages.
    assert main(["run", "--dataset", "prefix-repetition", "--num-prompts", "16", "--num-pages", "256",
                 "--max-num-batched-tokens", "64",
                 "--json", str(path), "--no-progress"]) == 0
    assert json.loads(path.read_text())["prefix_hit_rate"] > 0.2


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:nope"], "unknown preset"),
    (["--model", "/no/such/folder"], "is not a folder"),
    (["--num-pages", "3", "--input-len", "200"], "needs"),
    (["--input-len", "5000"], "exceeds the model's context"),
])
def test_bad_input_is_a_message_and_exit_2(capsys, argv, message):
    assert main(["run", "--no-progress", "--num-prompts", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--input-len=0", "--output-len=-3", "--num-prompts=0", "--page-size=x"])
def test_non_positive_lengths_rejected_by_the_parser(flag):
    proc = subprocess.run([sys.executable, "-m", "pagemem.models.cli", "run", flag], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error" in proc.stderr
