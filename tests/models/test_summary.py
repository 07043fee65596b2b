"""The run summary tells what happened: demoted swaps count as recomputes, figures that do not
exist say so, steps are classified by their rows, and the timeline's lines sit on their own
axes with legends clear of the data."""
from __future__ import annotations

import json

import pytest

from pagemem.models import SamplingParams, load_model
from pagemem.models.cli import main
from pagemem.models.engine import LLM
from pagemem.models.summary import format_summary, split_steps, summarize, summarize_simulation, timeline_figure
from pagemem.simulator import SimConfig, Simulator, StepModel
from pagemem.traces import TraceRequest


@pytest.fixture(scope="module")
def swapping_llm():
    """random:tiny on a pool of 47 pages, 24 ragged prompts: it swaps (pagemem run's defaults)."""
    import numpy as np
    llm = LLM(load_model("random:tiny", device="cpu", seed=3), num_pages=48, preemption="swap", swap_space=0.01,
              max_num_batched_tokens=2048)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 250, rng.integers(48, 144)).tolist() for _ in range(24)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(32, 96)), ignore_eos=True) for _ in prompts]
    return llm, llm.generate(prompts, params)


def test_demoted_swaps_count_as_recomputes(tmp_path, capsys):
    """pagemem run's prefix-repetition workload of 32 prompts demotes swapped requests (their
    shared pages block the queue): each is one preemption, served by recompute, its host copy
    dropped (pages out exceed pages in by exactly those)."""
    path = tmp_path / "s.json"
    assert main(["run", "--dataset", "prefix-repetition", "--num-prompts", "32", "--json", str(path),
                 "--no-progress"]) == 0
    s = json.loads(path.read_text())
    assert s["pages_swapped_out"] > s["pages_swapped_in"], "the workload must drop host copies"
    assert s["demotions"] > 0 and s["preemptions_recompute"] >= s["demotions"]
    out = capsys.readouterr().out
    assert f"recompute {s['preemptions_recompute']} ({s['demotions']} of them swapped first, then demoted)" in out
    assert f"({s['pages_swapped_out'] - s['pages_swapped_in']} never: host copies dropped)" in out


def test_preemption_counts_add_up_to_the_requests_own(swapping_llm):
    llm, outputs = swapping_llm
    s = summarize(llm, outputs)
    assert s["preemptions_swap"] > 0
    assert s["preemptions_swap"] + s["preemptions_recompute"] == sum(o.num_preemptions for o in outputs)


def test_tpot_of_one_token_outputs_is_not_a_number_but_na(tmp_path, capsys):
    path = tmp_path / "s.json"
    assert main(["run", "--output-len", "1", "--range-ratio", "0", "--num-prompts", "4", "--json", str(path),
                 "--no-progress"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("TPOT"))
    assert line.split()[-1] == "n/a" and "0.00" not in line
    s = json.loads(path.read_text())
    assert s["tpot_p50_ms"] is None and s["tpot_p99_ms"] is None and s["ttft_p50_ms"] > 0


def test_one_token_prompt_chunks_are_prefill_steps():
    """Budget 1: a prompt of 5 goes in five one-token steps; then two decode steps (output 3)."""
    model = StepModel((1,), (1,), ((1.0,),), 1.0, 0.0, 1.0, 1.0, 1)
    result = Simulator([TraceRequest(0.0, 5, 3)], model, SimConfig(64, 4, max_num_batched_tokens=1)).run()
    s = summarize_simulation(result)
    assert (s["prefill_steps"], s["prefill_tokens"], s["decode_steps"]) == (5, 5, 2)
    assert (s["prefill_s"], s["decode_s"], s["mean_decode_batch"]) == (5.0, 2.0, 1.0)
    assert "2 decode (2.00 s, mean batch 1), 5 with prefill (5.00 s)" in format_summary(s)


def test_records_without_a_prefill_count_fall_back_to_their_token_count():
    """A record with no ``num_prefill_tokens`` (one saved by an older run) counts a step of more
    tokens than rows as prefill, all its tokens; a step of one token a row as decode."""
    from collections import namedtuple
    Old = namedtuple("Old", "seconds num_seqs num_tokens")
    split = split_steps([Old(1.0, 2, 9), Old(0.5, 3, 3), Old(0.25, 3, 3)])
    assert (split["prefill_steps"], split["prefill_tokens"], split["prefill_s"]) == (1, 9, 1.0)
    assert (split["decode_steps"], split["decode_s"], split["mean_decode_batch"]) == (2, 0.75, 3.0)


def test_engine_counts_one_token_prompt_chunks_as_prefill():
    """Budget 1: a prompt of 5 goes in five one-token steps, each a prefill step by the engine's
    own count (its token count alone could not tell), then two decode steps (output 3); every
    record carries the step's host times."""
    llm = LLM(load_model("random:tiny", device="cpu", seed=3), num_pages=16, max_num_batched_tokens=1)
    llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    steps = llm.stats.steps
    assert [s.num_prefill_tokens for s in steps] == [1, 1, 1, 1, 1, 0, 0]
    s = split_steps(steps)
    assert (s["prefill_steps"], s["prefill_tokens"], s["decode_steps"]) == (5, 5, 2)
    assert all(0 < r.schedule_s and 0 < r.launch_s and 0 <= r.wait_s for r in steps)
    parts = sum(r.schedule_s + r.launch_s + r.wait_s for r in steps)
    assert parts <= llm.stats.end_t - llm.stats.start_t


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_timeline_puts_each_line_on_its_axis_and_legends_off_the_data(swapping_llm, tmp_path):
    llm, _ = swapping_llm
    steps = llm.stats.steps
    fig = timeline_figure(steps, llm.pool.num_pages - 1, "t")
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    lines = {label: ax for ax in fig.axes for line in ax.get_lines() for label in [line.get_label()]}
    assert lines["requests swapped now"] is axes["requests"]
    assert {lines["swapped out"], lines["swapped in"]} == {axes["pages (cumulative)"]}
    swapped_now = next(l for l in axes["requests"].get_lines() if l.get_label() == "requests swapped now")
    assert max(swapped_now.get_ydata()) == max(s.num_swapped for s in steps) > 0
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not any(_overlaps(legend, other.get_window_extent(renderer)) for other in fig.axes), ax.get_ylabel()
    import matplotlib.pyplot as plt
    plt.close(fig)
    from pagemem.models.summary import plot_timeline
    plot_timeline(llm, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
