"""The engine against an oracle that shares none of its code: Hugging Face transformers' greedy
``generate`` in float64 on the same weights (tiny random Llama, Qwen2, Mistral and GPT-2
checkpoints written by save_pretrained), through every way the engine serves a request: one
batch, chunked prefill, preemption by swap and by recompute, prefix caching, async scheduling on
and off.

Margin rule: our float32 logits are within 1.5e-5 of transformers' float64 ones on these models,
so a token is compared with transformers' where its float64 top-2 margin is at least HF_MARGIN
(1e-3). At a smaller margin (none occurs on these prompts today) our token must be one of the
near-tied ones, and past it each of our tokens must be float64's argmax on our own prefix, to the
same margin (teacher forcing).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from _oracle import HF_MARGIN, assert_greedy_everywhere, is_near_tie
from hf_models import ARCHS
from pagemem.models import SamplingParams, load_model
from pagemem.models.engine import LLM

MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)   # HF models have no EOS

# (engine keyword arguments, what the run must show it did)
ENGINES = {
    "batched": (dict(num_pages=128, page_size=4, swap_space=0), None),
    "chunked": (dict(num_pages=128, page_size=4, swap_space=0, max_num_batched_tokens=5), "chunked"),
    "swap": (dict(num_pages=13, page_size=4, preemption="swap", swap_space=0.01), "swap"),
    "recompute": (dict(num_pages=13, page_size=4, preemption="recompute", swap_space=0), "recompute"),
    "prefix": (dict(num_pages=128, page_size=4, swap_space=0, enable_prefix_caching=True,
                    max_num_batched_tokens=24), "prefix"),
}


@pytest.fixture(scope="module")
def prompts():
    """Eight ragged prompts (1 to 19 tokens), four of them behind a shared 12-token prefix."""
    rng = np.random.default_rng(11)
    shared = rng.integers(0, 300, 12).tolist()
    return [(shared if i % 2 else []) + rng.integers(0, 300, int(rng.integers(1, 8 if i % 2 else 20))).tolist()
            for i in range(8)]


@pytest.fixture(scope="module")
def oracle(hf_checkpoints, prompts):
    """arch -> (our model, float64 transformers model, per prompt (HF's tokens, HF's top-2 margins))."""
    out = {}
    for arch in ARCHS:
        path, hf = hf_checkpoints[arch]
        hf64 = copy.deepcopy(hf).double()
        refs = []
        for p in prompts:
            with torch.no_grad():
                g = hf64.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True)
            margins = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in g.scores]
            refs.append((g.sequences[0, len(p):].tolist(), margins))
        out[arch] = (load_model(path, device="cpu"), hf64, refs)
    return out


def _hf_logits(hf64):
    def logits(ids):
        with torch.no_grad():
            return hf64(torch.tensor([ids])).logits[0].numpy()          # [T, V] float64
    return logits


def _check_against_hf(hf64, prompt, got: list[int], ref: list[int], margins: list[float]) -> int:
    """Our tokens equal HF's up to its first near tie; from there each is float64's choice on our
    prefix. Returns how many tokens were compared with HF's own."""
    cut = next((k for k, m in enumerate(margins) if m < HF_MARGIN), len(ref))
    assert got[:cut] == ref[:cut], f"first difference at token {next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)}"
    if cut < len(ref):
        logits = _hf_logits(hf64)(list(prompt) + got[:cut])[-1]
        assert is_near_tie(logits, (got[cut],), HF_MARGIN)
        assert_greedy_everywhere(_hf_logits(hf64), list(prompt) + got[:cut + 1], got[cut + 1:], HF_MARGIN)
    return cut


def _shows(llm: LLM, what: str | None, prompts) -> None:
    """The run took the path its name says."""
    pre = llm.scheduler.num_preemptions
    if what == "chunked":
        assert max(map(len, prompts)) > llm.scheduler.max_num_batched_tokens
        assert sum(s.num_prefill_tokens > 0 for s in llm.stats.steps) > len(prompts)   # prompts over several steps
    elif what in ("swap", "recompute"):
        assert pre[what] > 0 and pre["swap" if what == "recompute" else "recompute"] == 0
    elif what == "prefix":
        assert llm.prefix_cache.stats().num_hit_tokens > 0
    else:
        assert sum(pre.values()) == 0 and max(s.num_seqs for s in llm.stats.steps) == len(prompts)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_greedy_matches_transformers(oracle, prompts, arch, engine, async_scheduling):
    model, hf64, refs = oracle[arch]
    kwargs, what = ENGINES[engine]
    llm = LLM(model, async_scheduling=async_scheduling, **kwargs)
    outs = llm.generate(prompts, GREEDY)
    _shows(llm, what, prompts)
    compared = 0
    for prompt, out, (ref, margins) in zip(prompts, outs, refs):
        assert len(out.token_ids) == MAX_TOKENS and out.finish_reason == "length"
        compared += _check_against_hf(hf64, prompt, out.token_ids, ref, margins)
    assert compared >= 0.9 * MAX_TOKENS * len(prompts)        # the margin rule skipped next to nothing
    llm.pool.check_integrity()
