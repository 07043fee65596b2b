"""pagemem serve through the official openai client: a server in a child process on a free
loopback port (random:tiny on the CPU; SmolLM2-135M-Instruct for chat), checked against the
offline engine on the same weights. Also TextStream (incremental decoding, stop strings) alone,
and every bad-input case: OpenAI's error body, the right status, and a server that keeps serving."""
from __future__ import annotations

import functools
import itertools

import httpx2
import numpy as np
import openai
import pytest

from pagemem.models import LLM, SamplingParams
from pagemem.models.chat import chat_prompt
from pagemem.models.server_process import ServerProcess
from pagemem.models.server_text import TextStream
from pagemem.models.tokenizer import ByteTokenizer

TINY = ["--model", "random:tiny", "--device", "cpu", "--num-pages", "256", "--page-size", "16",
        "--max-num-batched-tokens", "256", "--debug-endpoints", "--log-level", "warning"]
PROMPT = "The quick brown fox"


TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "chat.jinja").write_text(TEMPLATE)
    with ServerProcess(TINY + ["--chat-template", str(folder / "chat.jinja")], folder / "tiny.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0, timeout=60)


@functools.cache
def offline_tiny() -> LLM:
    """The server's weights (random:tiny, seed 0) in this process, with a roomy pool."""
    return LLM("random:tiny", device="cpu", num_pages=512, swap_space=0)


def completion(client, prompt=PROMPT, *, stream=False, **kw):
    """(text, token ids, finish_reason) of choice 0, streamed chunks joined if ``stream``."""
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    args = dict(model="random:tiny", prompt=prompt, max_tokens=kw.pop("max_tokens", 24), extra_body=extra, **kw)
    if not stream:
        c = client.completions.create(**args).choices[0]
        return c.text, c.token_ids, c.finish_reason
    text, ids, reason = "", [], None
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            text, ids, reason = text + c.text, ids + c.token_ids, c.finish_reason or reason
    return text, ids, reason


# ---- TextStream -----------------------------------------------------------------------------
def feed_one_by_one(ids, decode, stop=()):
    """Every ready() along the way, and the final text."""
    ts, seen = TextStream(decode, stop), []
    for t in ids:
        ts.add([t])
        seen.append(ts.ready())
    ts.flush()
    return seen, ts


def test_text_stream_decodes_incrementally_as_a_full_decode_would():
    tok = ByteTokenizer()
    text = "naïve café — 東京 ✓ end"
    rng = np.random.default_rng(0)
    for ids in (tok.encode(text), rng.integers(0, 259, 200).tolist()):   # real UTF-8; random bytes and specials
        seen, ts = feed_one_by_one(ids, tok.decode)
        assert ts.text == tok.decode(ids)
        assert all(ts.text.startswith(s) for s in seen)     # nothing handed out is ever taken back
    seen, _ = feed_one_by_one(tok.encode(text), tok.decode)
    assert "東" not in seen[text.encode().index("東".encode()) + 1]   # waits for the character's last byte


def test_text_stream_cuts_at_a_stop_string_spanning_tokens_and_never_shows_it():
    tok = ByteTokenizer(add_bos=False)
    seen, ts = feed_one_by_one(tok.encode("hello world, lo wo"), tok.decode, stop=("lo w", "zz"))
    assert ts.stopped and ts.text == "hel"
    assert all("hel".startswith(s) for s in seen)          # "lo w" held back until it was decided
    seen, ts = feed_one_by_one(tok.encode("a lo"), tok.decode, stop=("lo w",))
    assert seen == ["a", "a ", "a ", "a "]                  # "l", "lo" might still become "lo w"
    assert not ts.stopped and ts.ready() == ts.text == "a lo"


def test_text_stream_on_smollm2_text_matches_its_decode():
    tok = smollm().tokenizer
    ids = tok.encode("Hello there! Ünïcödé, emoji 🙂 and   spaces.\nNew line, the end.")
    seen, ts = feed_one_by_one(ids, tok.decode)
    assert ts.text == tok.decode(ids) and all(ts.text.startswith(s) for s in seen)
    _, ts = feed_one_by_one(ids, tok.decode, stop=("emoji",))
    assert ts.text == tok.decode(ids).split("emoji")[0]


# ---- completions on random:tiny -------------------------------------------------------------
def test_models_and_health(tiny_server, client):
    assert [m.id for m in client.models.list().data] == ["random:tiny"]
    assert httpx2.get(tiny_server.url + "/health").json() == {"status": "ok"}


def test_stream_equals_plain_and_the_offline_engine_greedy_or_seeded(client):
    """Greedy on three prompts, and sampled with a seed (a text of mostly printable characters, where
    greedy's is all U+FFFD): plain and streamed calls give the offline engine's token ids and text."""
    prompts = [PROMPT, "abc", "Zebra crossing at noon"]
    ref = offline_tiny().generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for prompt, want in zip(prompts, ref):
        plain = completion(client, prompt, temperature=0.0, extra_body={"ignore_eos": True})
        streamed = completion(client, prompt, stream=True, temperature=0.0, extra_body={"ignore_eos": True})
        assert plain == streamed
        assert plain[1] == want.token_ids and plain[0] == want.text and plain[2] == "length"
    want = offline_tiny().generate([PROMPT], SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True))[0]
    assert sum(ch != "\ufffd" for ch in want.text) >= 12
    for stream in (False, True):
        got = completion(client, stream=stream, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
        assert got == (want.text, want.token_ids, "length")


def test_n_choices_and_seeds(client):
    kw = dict(model="random:tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    first = client.completions.create(n=3, **kw)
    again = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]   # the same seeded call
    assert len(set(texts)) == 3                               # each choice draws with its own seed
    assert client.completions.create(n=1, **kw).choices[0].text == texts[0]
    other = client.completions.create(n=1, **{**kw, "seed": 99}).choices[0].text
    assert other != texts[0]
    assert first.usage.completion_tokens == 48 and first.usage.prompt_tokens == len(PROMPT) + 1   # + BOS
    streamed = completion(client, stream=True, max_tokens=16, temperature=1.0, seed=1234,
                          extra_body={"ignore_eos": True})
    assert streamed[0] == texts[0]


def test_stop_strings_cut_the_text_and_end_the_request(client):
    kw = dict(temperature=1.0, seed=5, max_tokens=48, extra_body={"ignore_eos": True})
    full, ids, _ = completion(client, **kw)
    tok = ByteTokenizer()
    # a stop string of three characters from the middle of the text, first seen there
    at = next(i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3] and full.find(full[i:i + 3]) == i)
    stop = full[at:at + 3]
    ends = next(j for j in range(1, len(ids) + 1) if stop in tok.decode(ids[:j]))   # the token that completes it
    for stream in (False, True):
        text, got, reason = completion(client, stream=stream, stop=[stop, "\x00never"], **kw)
        assert (text, reason) == (full[:at], "stop")
        assert got == ids[:ends]                     # the request ended on the token that made the stop string


def test_stop_token_ids_end_before_the_token(client):
    full, ids, _ = completion(client, temperature=1.0, seed=8, max_tokens=32, extra_body={"ignore_eos": True})
    stop_id = next(t for t in ids[3:] if t < 128)        # an ASCII byte, whose text would show
    cut = ids.index(stop_id)
    text, got, reason = completion(client, temperature=1.0, seed=8, max_tokens=32,
                                   extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert (got, reason) == (ids[:cut + 1], "stop")
    assert text == ByteTokenizer().decode(ids[:cut])


LOGPROB_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def test_completion_logprobs(client):
    """Sampled with a seed, logprobs=3: the offline engine's tokens, logprobs and top 3 (tokens as
    "token_id:N", so no two share a key), each logprob <= 0 and at most the best of its top, the top
    sorted best first; text_offset is where each token's text starts (the lengths of the tokens'
    decoded texts before it); tokens as text are each token's decoded text. A stream carries the same
    logprobs object (the pieces of its chunks joined)."""
    kw = dict(model="random:tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, logprobs=3,
              extra_body={"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True})
    want = offline_tiny().generate([PROMPT], SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True,
                                                            logprobs=3))[0]
    c = client.completions.create(**kw).choices[0]
    lp = c.logprobs
    assert c.token_ids == want.token_ids and len(set(c.token_ids)) > 8
    assert lp.tokens == [f"token_id:{t}" for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs])
    assert lp.top_logprobs == [pytest.approx({f"token_id:{i}": v for i, v in t.top}) for t in want.logprobs]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert chosen <= values[0] <= 0.0
    assert any(chosen < top[0] for chosen, top in zip(lp.token_logprobs, (list(t.values()) for t in lp.top_logprobs)))
    decoded = [ByteTokenizer().decode([t]) for t in c.token_ids]
    assert lp.text_offset == list(itertools.accumulate(map(len, decoded[:-1]), initial=0))
    as_text = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True}}).choices[0].logprobs
    assert as_text.tokens == decoded and as_text.token_logprobs == lp.token_logprobs
    assert as_text.text_offset == lp.text_offset
    parts = [ch.choices[0].logprobs for ch in client.completions.create(stream=True, **kw) if ch.choices[0].logprobs]
    assert {f: sum((getattr(p, f) for p in parts), []) for f in LOGPROB_FIELDS} == \
        {f: getattr(lp, f) for f in LOGPROB_FIELDS}


def test_chat_through_a_given_template_streamed_or_not_with_n_and_usage(client):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    plain_conv = [conv[0], {"role": "user", "content": "Hi"}]
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=12)
    want = offline_tiny().chat(plain_conv, params, chat_template=TEMPLATE)[0]
    kw = dict(model="random:tiny", messages=conv, max_tokens=12, temperature=1.0, seed=21, n=2)
    r = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts[0] == want.text and texts[1] != texts[0]
    prompt_ids = chat_prompt(offline_tiny().model, plain_conv, params, chat_template=TEMPLATE)[0]
    assert r.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = ["", ""]
    for ch in chunks[:-1]:
        streamed[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert streamed == texts
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


# ---- chat on SmolLM2-135M-Instruct ----------------------------------------------------------
@functools.cache
def smollm():
    from pagemem.models.fetch import fetch_smollm2
    from pagemem.models.model import load_model
    return load_model(fetch_smollm2(), device="cpu")


@pytest.fixture(scope="module")
def smol_client(tmp_path_factory):
    from pagemem.models.fetch import fetch_smollm2
    args = ["--model", str(fetch_smollm2()), "--device", "cpu", "--num-pages", "64", "--log-level", "warning"]
    with ServerProcess(args, tmp_path_factory.mktemp("serve") / "smol.log") as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120), srv


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_matches_the_offline_engine_streamed_or_not(smol_client):
    client, srv = smol_client
    name = client.models.list().data[0].id
    params = SamplingParams(temperature=0.0, max_tokens=12)
    want = LLM(smollm(), num_pages=64, swap_space=0).chat(CHAT, params)[0]
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0.0)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(chat_prompt(smollm(), CHAT, params)[0])
    assert r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0.0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert sum(bool(c.choices[0].delta.content) for c in chunks) > 2       # the text came piece by piece


def test_chat_logprobs_and_n(smol_client):
    """n=2 with logprobs and top_logprobs=2: two choices, each with an entry per token, whose texts
    join into the reply; every logprob <= 0, the chosen one at most the best of its top, the top sorted
    best first, and each entry's bytes the UTF-8 of its token (whole characters here)."""
    client, _ = smol_client
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=4,
                                       temperature=0.8, seed=3, n=2, logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert sum(len(c.logprobs.content) for c in r.choices) == r.usage.completion_tokens
    for c in r.choices:
        entries = c.logprobs.content
        assert "".join(e.token for e in entries).startswith(c.message.content)
        for e in entries:
            top = [t.logprob for t in e.top_logprobs]
            assert len(top) == 2 and top == sorted(top, reverse=True)
            assert e.logprob <= top[0] <= 0.0
            for x in (e, *e.top_logprobs):
                assert "\ufffd" not in x.token and x.bytes == list(x.token.encode("utf-8"))


def test_chat_logprob_bytes_are_the_tokens_own(client):
    """random:tiny's greedy tokens are single bytes of multi-byte characters (each decodes to
    U+FFFD): every chat logprob entry, chosen or top, carries its token's own byte, so a client
    can put the characters together; the ids are the offline engine's."""
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="random:tiny", messages=messages, max_tokens=8, temperature=0.0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    want = offline_tiny().chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3),
                               chat_template=TEMPLATE)[0]
    entries = r.choices[0].logprobs.content
    own = lambda t: [t] if t < 256 else []                  # noqa: E731 -- ids 256.. are BOS, EOS, PAD
    assert [e.bytes for e in entries] == [own(t) for t in want.token_ids]
    assert [[x.bytes for x in e.top_logprobs] for e in entries] == [[own(i) for i, _ in lp.top] for lp in want.logprobs]
    assert any(e.token == "\ufffd" and e.bytes != list("\ufffd".encode("utf-8")) for e in entries)


# ---- bad input ------------------------------------------------------------------------------
BAD_COMPLETIONS = [   # (body, param the error names)
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"), ({"prompt": "x", "bogus": 1}, "bogus"), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"max_tokens": 4}, "prompt"), ([1, 2], None),
    ({"prompt": [1, 99999]}, None),                                  # a token id past the vocabulary
    ({"prompt": "x" * 5000}, "prompt"), ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),   # past the context
    ({"prompt": [1] * 100, "max_tokens": 3990}, None),              # fits the context, not the pool
    (b'{"prompt": "\\ud800"}', "prompt"), ({"prompt": "x", "top_k": 2**40}, "top_k"),   # not UTF-8; past the kernel's range
]


def assert_error(r, status: int, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    return err


def test_bad_requests_get_openai_errors_and_touch_no_other_request(tiny_server, client):
    """Every bad body gets OpenAI's error while a long seeded stream runs: the stream is still live
    after them (/debug/pool), and the tokens it made meanwhile are the offline engine's."""
    stream = client.completions.create(model="random:tiny", prompt=PROMPT, max_tokens=3000, temperature=1.0, seed=7,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = iter(stream)
    got = next(chunks).choices[0].token_ids                 # running while the bad requests come
    with httpx2.Client(base_url=tiny_server.url, timeout=30) as http:
        r = http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
        assert "not valid JSON" in assert_error(r, 400)["message"]
        for body, param in BAD_COMPLETIONS:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            err = assert_error(http.post("/v1/completions", **kw), 400, param)
            assert err["type"] == "invalid_request_error"
        assert assert_error(http.post("/v1/completions", json={"prompt": "x" * 5000}), 400,
                            "prompt")["code"] == "context_length_exceeded"
        assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")
        assert_error(http.post("/v1/chat/completions", json={"messages": [{"content": "hi"}]}), 400, "messages")
        assert_error(http.post("/v1/chat/completions", json={"messages": CHAT, "top_logprobs": 2}), 400, "top_logprobs")
        assert http.get("/health").status_code == 200
        nulls = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": None, "temperature": None,
                                                   "stop": None, "ignore_eos": True})
        assert nulls.status_code == 200 and nulls.json()["usage"]["completion_tokens"] == 16   # null: the default
        pool = http.get("/debug/pool").json()
    assert (pool["num_live_choices"], pool["num_running"], pool["num_waiting"]) == (1, 1, 0)
    made = pool["num_used"] * 16 - (len(PROMPT) + 1)    # at most this many tokens by now (16-token pages)
    assert 0 < made < 3000
    while len(got) < made:                              # read on past every token made during the bad requests
        got += next(chunks).choices[0].token_ids
    stream.close()
    want = offline_tiny().generate([PROMPT], SamplingParams(temperature=1.0, seed=7, max_tokens=len(got),
                                                            ignore_eos=True))
    assert got == want[0].token_ids
    assert completion(client, temperature=1.0, seed=7, max_tokens=48, extra_body={"ignore_eos": True})[1] == got[:48]


def test_a_full_waiting_queue_gets_503_with_retry_after(tmp_path):
    args = TINY + ["--max-num-seqs", "1", "--max-waiting", "1"]
    with ServerProcess(args, tmp_path / "busy.log") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
        kw = dict(model="random:tiny", prompt="a", max_tokens=3000, temperature=0.0, stream=True,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        running = client.completions.create(**kw)
        next(iter(running))                              # the one slot is taken
        waiting = client.completions.create(**kw)        # accepted: the queue is now full
        r = httpx2.post(srv.url + "/v1/completions", json={"prompt": "b", "max_tokens": 2}, timeout=30)
        assert assert_error(r, 503)["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        no_template = assert_error(httpx2.post(srv.url + "/v1/chat/completions", json={"messages": CHAT}), 400,
                                   "messages")            # random:tiny has none, and none was given
        assert "no chat template" in no_template["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="random:tiny", prompt="c", max_tokens=2)
        assert e.value.status_code == 503
        running.close()
        waiting.close()
        after = client.completions.create(model="random:tiny", prompt="d", max_tokens=2, temperature=0.0)
        assert after.choices[0].finish_reason in ("stop", "length")
