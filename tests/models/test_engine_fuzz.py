"""Fuzzing of the engine's entry points with arbitrary Python values in every argument (wrong
types, NaN, infinities, negatives, huge ints, empty and nested lists, strings for ids, bytes,
NumPy scalars and arrays): each call succeeds or raises TypeError/ValueError (FileNotFoundError
for a model path that is not there), and afterwards the same engine serves a fixed greedy request
with a fresh engine's tokens, its pool whole."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from hypothesis_budget import scaled

from _oracle import assert_same_greedy, ours
from pagemem.backend import cuda_unavailable_reason
from pagemem.models import SamplingParams, load_model
from pagemem.models.generate import generate
from pagemem.models.engine import LLM
from pagemem.models.sampling import SEED_LIMIT

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REFUSED = (TypeError, ValueError)
FIXED, FIXED_PARAMS = [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

NAN, INF = float("nan"), float("inf")
ODD_VALUES = [None, True, False, np.bool_(True), 0, -1, 2**31, 2**63, 2**64, -2**70, 10**30, NAN, INF, -INF,
              -0.0, 1e308, 1e-310, 1.5, "", "1", "abc", b"x", [], (), [[]], [1.5], ["a"], [-1], {}, {1}, {"a": 1},
              np.int64(3), np.float32(NAN), np.float64(INF), np.array([1.5]), np.array([[1, 2]]), np.array(3), object()]


@st.composite
def choice(draw, *strategies):
    """One of ``strategies``, each as likely (st.one_of flattens nested one_ofs, so a group of many
    small strategies would be drawn from nearly every time)."""
    return draw(strategies[draw(st.integers(0, len(strategies) - 1))])


WILD = choice(
    st.sampled_from(ODD_VALUES), st.sampled_from(ODD_VALUES),
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.one_of(st.text(max_size=5), st.binary(max_size=4)),
    st.one_of(st.lists(st.integers(-3, 300), max_size=4), st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=3),
              st.lists(st.text(max_size=2), max_size=3), st.lists(st.floats(), max_size=3),
              st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.sets(st.integers(0, 5), max_size=3)),
    st.one_of(st.builds(np.int64, st.integers(-5, 300)), st.builds(np.float32, st.floats(width=32))),
)


@st.composite
def fields(draw, valid: dict):
    """Keyword arguments: most of ``valid``'s names (each left out one time in four), each valid
    or, one time in five, drawn from WILD."""
    out = {}
    for name in sorted(valid):
        kind = draw(st.integers(0, 19), label=f"{name}?")    # 0-4: left out, 5-8: wild, else valid
        if kind >= 5:
            out[name] = draw(WILD if kind <= 8 else valid[name], label=name)
    return out


@functools.cache
def _tiny():
    return load_model("random:tiny", device="cpu", seed=3)


@functools.cache
def _fixed_tokens() -> list[int]:
    (out,) = LLM(_tiny(), num_pages=16, page_size=4, swap_space=0).generate([FIXED], FIXED_PARAMS)
    return out.token_ids


def _serves_like_a_fresh_engine(llm: LLM) -> None:
    assert not llm.has_unfinished() and not llm._states
    llm.pool.check_integrity()
    (out,) = llm.generate([FIXED], FIXED_PARAMS)
    assert out.token_ids == _fixed_tokens()
    llm.pool.check_integrity()
    assert llm.pool.stats().num_used == 0


# ---- SamplingParams ------------------------------------------------------------------------------
PARAM_FIELDS = {
    "temperature": st.sampled_from([0.0, 0.7, 1.0]), "top_k": st.sampled_from([0, 1, 5]),
    "top_p": st.sampled_from([1.0, 0.9]), "max_tokens": st.integers(1, 4),
    "stop_token_ids": st.lists(st.integers(0, 258), max_size=2), "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "ignore_eos": st.booleans(), "min_p": st.sampled_from([0.0, 0.1]), "logprobs": st.one_of(st.none(), st.integers(0, 3)),
}


def _well_formed(p: SamplingParams) -> None:
    """What an accepted SamplingParams holds: plain, finite, in range."""
    for name in ("temperature", "top_p", "min_p"):
        assert math.isfinite(getattr(p, name)) and not isinstance(getattr(p, name), bool)
    assert p.temperature >= 0 and 0 < p.top_p <= 1 and 0 <= p.min_p < 1
    assert isinstance(p.top_k, (int, np.integer)) and not isinstance(p.top_k, bool) and 0 <= p.top_k < 2**31
    assert isinstance(p.max_tokens, (int, np.integer)) and not isinstance(p.max_tokens, bool) and p.max_tokens >= 1
    assert isinstance(p.stop_token_ids, tuple) and all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert p.seed is None or 0 <= p.seed < SEED_LIMIT
    assert p.logprobs is None or 0 <= p.logprobs <= 20
    assert isinstance(p.ignore_eos, (bool, np.bool_))


@settings(max_examples=scaled(1000), **SETTINGS)
@given(fields(PARAM_FIELDS))
def test_sampling_params_accept_or_refuse(kwargs):
    try:
        p = SamplingParams(**kwargs)
    except REFUSED as e:
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    _well_formed(p)


# ---- LLM.generate ----------------------------------------------------------------------------------
# Prompts of the right types; the long ones do not fit the fuzzed engine's pool (ValueError).
VALID_PROMPT = choice(st.lists(st.integers(0, 258), min_size=1, max_size=8), st.text(max_size=6),
                      st.lists(st.integers(0, 258), min_size=40, max_size=60))
VALID_PARAMS = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.8]), max_tokens=st.integers(1, 4),
                         ignore_eos=st.booleans(), seed=st.one_of(st.none(), st.integers(0, 99)))


@st.composite
def _one_wild(draw, valid_list):
    """A valid list with one element replaced by anything."""
    items = draw(valid_list)
    if items:
        items[draw(st.integers(0, len(items) - 1))] = draw(WILD)
    return items


@st.composite
def generate_calls(draw):
    """(prompts, params, use_tqdm): valid about half the time, else with one or two of them, or
    one element of a list, replaced by anything."""
    many_prompts = st.lists(VALID_PROMPT, min_size=1, max_size=4)
    many_params = st.lists(VALID_PARAMS, min_size=1, max_size=4)
    valid = {"prompts": choice(VALID_PROMPT, many_prompts, many_prompts),
             "params": choice(st.none(), VALID_PARAMS, many_params, st.builds(tuple, many_params)),
             "use_tqdm": st.just(False)}
    wild = {"prompts": choice(WILD, _one_wild(many_prompts), _one_wild(many_prompts), st.just([]),
                              st.lists(_one_wild(st.lists(st.integers(0, 258), min_size=1, max_size=5)),
                                       min_size=1, max_size=3)),
            "params": choice(WILD, _one_wild(many_params), st.just([])), "use_tqdm": WILD}
    bad = set(draw(st.permutations(sorted(valid)))[:draw(st.sampled_from([0, 0, 0, 1, 1, 2]), label="wild args")])
    return tuple(draw((wild if name in bad else valid)[name], label=name) for name in ("prompts", "params", "use_tqdm"))


@pytest.fixture(scope="module")
def engine_under_fuzz():
    """One engine for every example: it must survive them all."""
    return LLM(_tiny(), num_pages=12, page_size=4, swap_space=0.001, preemption="swap", max_num_batched_tokens=16)


@settings(max_examples=scaled(200), **SETTINGS)
@given(call=generate_calls())
def test_generate_accepts_or_refuses_and_the_engine_survives(engine_under_fuzz, call):
    llm, (prompts, params, use_tqdm) = engine_under_fuzz, call
    try:
        outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    except REFUSED as e:
        event(f"refused: {type(e).__name__}")
    else:
        event("served")
        n = 1 if isinstance(prompts, str) else len(prompts)
        assert len(outs) == n and all(o.finish_reason in ("length", "stop") for o in outs)
    _serves_like_a_fresh_engine(llm)


@settings(max_examples=scaled(100), **SETTINGS)
@given(call=fields({"prompt": VALID_PROMPT, "params": VALID_PARAMS, "priority": st.integers(-2, 2)}))
def test_add_request_accepts_or_refuses_and_the_engine_survives(engine_under_fuzz, call):
    llm = engine_under_fuzz
    assume({"prompt", "params"} <= call.keys())    # both are required arguments: drawn again, not passed
    try:
        req = llm.add_request(**call)
    except REFUSED as e:
        event(f"refused: {type(e).__name__}")
    else:
        event("served")
        while llm.has_unfinished():              # the request, and a step of it still in flight
            llm.step()
        assert llm.is_finished(req) and len(llm.pop_output(req).token_ids) >= 1
    _serves_like_a_fresh_engine(llm)


# ---- LLM(...) and load_model ------------------------------------------------------------------------
ENGINE_FIELDS = {
    "page_size": st.sampled_from([1, 4, 16]), "num_pages": st.sampled_from([None, 8, 32]),
    "gpu_memory_utilization": st.sampled_from([0.5, 0.9]), "swap_space": st.sampled_from([0, 0.001, 0.01]),
    "max_num_seqs": st.sampled_from([1, 4, 256]), "max_num_batched_tokens": st.sampled_from([1, 16, 2048]),
    "preemption": st.sampled_from(["recompute", "swap", "auto"]), "eviction": st.sampled_from(["lru", "fifo", "priority"]),
    "enable_prefix_caching": st.booleans(), "seed": st.integers(0, 5), "watermark": st.sampled_from([0.0, 0.01]),
    "cuda_graph": st.booleans(), "admit_batch": st.sampled_from([1, 2]), "async_scheduling": st.booleans(),
    "dtype": st.sampled_from([None, "float32"]), "device": st.sampled_from(["auto", "cpu"]),
}


def _cuda_refused(kwargs, error) -> bool:
    """device='cuda' where CUDA is missing is the backend's RuntimeError, naming it."""
    return (isinstance(error, RuntimeError) and kwargs.get("device") == "cuda"
            and cuda_unavailable_reason() is not None and "device='cuda'" in str(error))


@settings(max_examples=scaled(150), **SETTINGS)
@given(st.data())
def test_llm_constructor_accepts_or_refuses(data):
    kwargs = data.draw(fields(ENGINE_FIELDS), label="kwargs")
    kwargs.setdefault("num_pages", 32)                 # the 1 GiB CPU default is tested elsewhere
    model = data.draw(choice(st.just(_tiny()), st.just(_tiny()), st.just("random:tiny"), WILD), label="model")
    try:
        llm = LLM(model, **kwargs)
    except REFUSED as e:
        event(f"refused: {type(e).__name__}")
        return
    except RuntimeError as e:
        assert _cuda_refused(kwargs, e), e
        return
    try:
        (out,) = llm.generate([FIXED], FIXED_PARAMS)
    except ValueError as e:                              # a valid engine too small for the request
        assert "needs" in str(e), e
    else:
        event("built and served")
        want = generate(llm.model, [FIXED], FIXED_PARAMS)
        assert_same_greedy(ours(llm.model), [FIXED], [(out.token_ids, out.finish_reason)], [(want[0], "length")])
    llm.pool.check_integrity()


@settings(max_examples=scaled(120), **SETTINGS)
@given(data=st.data())
def test_load_model_accepts_or_refuses(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("not_a_model")
    (folder / "notes.txt").write_text("hello")
    path = data.draw(choice(st.just("random:tiny"), st.sampled_from(["random:nope", "random:", "", "/no/such/folder",
                                                                     str(folder), str(folder / "notes.txt"), folder]),
                            WILD), label="path")
    kwargs = data.draw(fields({"dtype": st.sampled_from([None, "float32", "float16", "bfloat16"]),
                               "device": st.sampled_from(["cpu", "auto"]), "seed": st.integers(0, 3)}), label="kwargs")
    try:
        model = load_model(path, **kwargs)
    except (*REFUSED, FileNotFoundError) as e:
        event(f"refused: {type(e).__name__}")
        return
    except RuntimeError as e:
        assert _cuda_refused(kwargs, e), e
        return
    event("loaded")
    assert model.config.vocab_size == 259 and model.dtype.name in ("float32", "float16")


# ---- every odd value in every argument, one at a time -------------------------------------------------
VALID_SAMPLING = dict(temperature=0.7, top_k=5, top_p=0.9, max_tokens=3, stop_token_ids=[4], seed=1, ignore_eos=True,
                      min_p=0.1, logprobs=2)
VALID_ENGINE = dict(page_size=4, num_pages=32, gpu_memory_utilization=0.9, swap_space=0.001, max_num_seqs=4,
                    max_num_batched_tokens=16, preemption="swap", eviction="lru", enable_prefix_caching=True, seed=3,
                    watermark=0.01, cuda_graph=True, admit_batch=1, async_scheduling=True, dtype=None, device="cpu")


def _one_odd(valid: dict):
    return [pytest.param(name, value, id=f"{name}={value!r:.20}") for name in valid for value in ODD_VALUES]


@pytest.mark.parametrize("name, value", _one_odd(VALID_SAMPLING))
def test_each_odd_sampling_value(name, value):
    try:
        p = SamplingParams(**{**VALID_SAMPLING, name: value})
    except REFUSED:
        return
    _well_formed(p)


@pytest.mark.parametrize("name, value", _one_odd(VALID_ENGINE))
def test_each_odd_engine_value(name, value):
    kwargs = {**VALID_ENGINE, name: value}
    try:
        llm = LLM(_tiny(), **kwargs)
    except REFUSED:
        return
    except RuntimeError as e:
        assert _cuda_refused(kwargs, e), e
        return
    (out,) = llm.generate([FIXED], FIXED_PARAMS)
    assert out.token_ids == _fixed_tokens()
    llm.pool.check_integrity()


@pytest.mark.parametrize("where", ["prompts", "prompt", "token", "params", "params item", "use_tqdm"])
def test_each_odd_generate_value(engine_under_fuzz, where):
    """Each odd value as the prompts, as one prompt of two, as a token id, as the params, as one
    SamplingParams of two, as use_tqdm: accepted or refused, and the engine serves as before."""
    llm, ok = engine_under_fuzz, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for value in ODD_VALUES:
        args = {"prompts": value, "prompt": [[5, 6], value], "token": [[5, value, 6]]}.get(where, [[5, 6], [7]])
        params = {"params": value, "params item": [ok, value]}.get(where, ok)
        try:
            outs = llm.generate(args, params, use_tqdm=value if where == "use_tqdm" else False)
        except REFUSED:
            pass
        else:
            assert len(outs) == (1 if isinstance(args, str) else len(args))
        _serves_like_a_fresh_engine(llm)


@pytest.mark.parametrize("name", ["path_or_random", "dtype", "device", "seed"])
def test_each_odd_load_model_value(name):
    valid = dict(path_or_random="random:tiny", dtype="float32", device="cpu", seed=0)
    for value in ODD_VALUES:
        kwargs = {**valid, name: value}
        try:
            model = load_model(**kwargs)
        except (*REFUSED, FileNotFoundError):
            continue
        assert model.config.vocab_size == 259 and model.dtype == np.float32
