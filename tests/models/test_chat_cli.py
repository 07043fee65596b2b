"""``pagemem chat``: the reply of one --prompt or of each stdin line, streamed as tokens come,
through the chat template; errors a user causes are one line and exit 2."""
from __future__ import annotations

import io

import pytest

from pagemem.models import LLM, SamplingParams
from pagemem.models.chat_cli import stream_reply
from pagemem.models.cli import build_parser, main
from test_chat import CHATML
from test_gguf import _add_tiny_vocab, random_hf, write_gguf
from test_real_model import our_smollm, smollm_path


class _Recorder(io.StringIO):
    """Standard output that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", random_hf("llama"), "F32", "llama",
                      tokenizer=_add_tiny_vocab)


def _run(argv: list[str], stdin: str = "") -> tuple[list[str], str]:
    args = build_parser().parse_args(argv)
    out = _Recorder()
    replies = args.func(args, stdin=io.StringIO(stdin), out=out)
    return replies, out.getvalue()


def test_stream_writes_each_step_and_adds_up_to_the_reply(tiny_gguf):
    """One write per step that adds text; together they are the reply, which is chat's text."""
    llm = LLM(tiny_gguf, device="cpu", num_pages=32, page_size=4)
    conv = [{"role": "user", "content": "the cat"}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    out = _Recorder()
    reply = stream_reply(llm, conv, params, out)
    pieces = [w for w in out.writes if w]
    assert len(pieces) >= 4 and "".join(out.writes) == reply + "\n"
    assert reply == llm.chat(conv, params)[0].text
    assert not llm.has_unfinished() and llm.pool.num_free_pages == llm.pool.num_pages - 1


def test_stdin_turns_keep_the_conversation(tiny_gguf):
    """Each stdin line is a user turn; the second prompt holds the first exchange."""
    replies, text = _run(["chat", "--model", str(tiny_gguf), "--device", "cpu", "--max-tokens", "5",
                          "--system", "Be kind."], stdin="the cat\n\nsat on\n")
    assert len(replies) == 2 and text == "".join(r + "\n" for r in replies)
    llm = LLM(tiny_gguf, device="cpu", num_pages=64, page_size=4)
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "sat on"}]
    assert replies[1] == llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=5))[0].text


def test_chat_template_file_serves_a_model_without_one(tmp_path):
    """--chat-template FILE renders the prompt of a model that has no template: the reply is
    LLM.chat's greedy reply with that template to the same conversation."""
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    replies, text = _run(["chat", "--model", "random:tiny", "--device", "cpu", "--prompt", "the cat sat",
                          "--max-tokens", "8", "--chat-template", str(template)])
    want = LLM("random:tiny", device="cpu", num_pages=32).chat(      # a prompt whose greedy reply the template sways
        [{"role": "user", "content": "the cat sat"}], SamplingParams(temperature=0.0, max_tokens=8),
        chat_template=CHATML)[0]
    assert len(want.token_ids) == 8 and replies == [want.text] and text == want.text + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:tiny"], "the model has no chat template"),
    (["--model", "/no/such.gguf"], "is not a folder, nor a .gguf file"),
    (["--model", "random:tiny", "--chat-template", "/no/such.jinja"], "--chat-template: no file at /no/such.jinja"),
    (["--model", "random:tiny", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    assert main(["chat", "--device", "cpu", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagemem: error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_real_model_answers_through_the_command_line(capsys, monkeypatch):
    """pagemem chat on SmolLM2 prints LLM.chat's greedy reply to the question."""
    question = "What is the capital of France?"
    assert main(["chat", "--model", str(smollm_path()), "--device", "cpu", "--prompt", question,
                 "--max-tokens", "32"]) == 0
    printed = capsys.readouterr().out
    want = LLM(our_smollm(), num_pages=32).chat([{"role": "user", "content": question}],
                                                SamplingParams(temperature=0.0, max_tokens=32))[0].text
    assert printed == want + "\n" and "Paris" in printed


def test_run_takes_a_gguf_file(tiny_gguf, capsys):
    """pagemem run serves its synthetic workload on a GGUF model."""
    assert main(["run", "--model", str(tiny_gguf), "--device", "cpu", "--num-pages", "24", "--num-prompts", "6",
                 "--input-len", "12", "--output-len", "6", "--no-progress"]) == 0
    assert "output tokens/s" in capsys.readouterr().out
