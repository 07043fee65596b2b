"""The CLI never answers a user's mistake with a traceback: every flag of run, chat, simulate,
calibrate and serve with bad values (negative, zero, NaN, infinities, text, empty, huge, folders,
missing files, unwritable places) exits with 2 and one line on stderr, or runs (exit 0) where the
value is a valid one; paths and optional dependencies are checked before the run, and before
``pagemem serve`` listens (it never listens here: the socket it would bind is refused); an
internal error keeps its traceback. Every flag's help shows its default. The server's HTTP side is
tested with the server."""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys

import pytest
import uvicorn

from pagemem.models import engine
from pagemem.models import cli
from pagemem.models.cli import build_parser, main
from test_chat import CHATML

HUGE = "1" + "0" * 30
NUMBERS = ["-1", "0", "nan", "inf", "abc", "", HUGE]
STRICT = {"-1", "nan", "abc", ""}           # never a valid value of a numeric flag
COMMANDS = ("run", "chat", "simulate", "calibrate", "serve")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "folder").mkdir()
    (root / "garbage.bin").write_bytes(b"\xff\x00{not json")
    (root / "chat.jinja").write_text(CHATML)
    return root


def _base(command: str, root) -> list[str]:
    """Flags that make a valid run of each command small enough for a test."""
    return {"run": ["run", "--no-progress", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"],
            "chat": ["chat", "--model", "random:tiny", "--device", "cpu", "--prompt", "hi", "--max-tokens", "2",
                     "--chat-template", str(root / "chat.jinja")],
            "simulate": ["simulate", "--no-progress", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"],
            "calibrate": ["calibrate", "--device", "cpu", "--model", "random:tiny", "--batch-sizes", "1",
                          "--context-lens", "8", "--decode-steps", "2", "--prefill-tokens", "16",
                          "--prefill-prompt-len", "8", "--swap-pages", "2", "--repeats", "1",
                          "--out", str(root / "step.json")],
            "serve": ["serve", "--port", "0"]}[command]


class Listening(Exception):
    """Where ``pagemem serve`` would bind its socket: every check of its flags has passed."""


@pytest.fixture
def no_listening(monkeypatch):
    """``pagemem serve`` stops where it would bind a socket or serve, raising Listening: a test
    cannot leave a server running (nor wait on one)."""
    def refuse(*args, **kwargs):
        raise Listening
    monkeypatch.setattr(socket, "create_server", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)


def _main(argv: list[str]) -> int:
    """main(argv), 0 where ``pagemem serve`` got as far as listening (see no_listening)."""
    try:
        return main(argv)
    except Listening:
        return 0


def _flags():
    """(command, flag, kind) of every flag that takes a value, read from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for command in COMMANDS:
        for action in sub.choices[command]._actions:
            if not action.option_strings or action.nargs == 0 or action.dest == "help":
                continue
            kind = ("choice" if action.choices else "path" if action.type is not None and action.type.__name__ == "Path"
                    else "text" if action.type is None else "number")
            out.append((command, action.option_strings[0], kind))
    return out


def _values(kind: str, root) -> list[str]:
    paths = [str(root / "folder"), str(root / "missing" / "x.json"), str(root / "missing.json"),
             str(root / "garbage.bin"), "/sys/pagemem.json", "/dev/null/x.json", ""]
    return {"number": NUMBERS, "choice": ["abc", "", "-1"], "path": paths,
            "text": ["abc", "", str(root / "folder"), "random:nope", "-1"]}[kind]


def _one_line_or_success(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("pagemem") and ": error: " in err, err


@pytest.mark.parametrize("command, flag, kind", [pytest.param(*f, id=f"{f[0]} {f[1]}") for f in _flags()])
def test_every_flag_with_bad_values(places, capsys, monkeypatch, no_listening, command, flag, kind):
    monkeypatch.delenv("PAGEMEM_DEBUG", raising=False)
    for value in _values(kind, places):
        rc = _main(_base(command, places) + [flag, value])
        out, err = capsys.readouterr()
        _one_line_or_success(rc, err)
        if kind in ("number", "choice") and value in STRICT:
            assert rc == 2, f"{command} {flag} {value!r} was accepted"
        if kind == "choice" and rc == 2 or (kind == "number" and value in STRICT and "argument" in err):
            assert f"argument {flag}" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--swap-space", "inf"], "argument --swap-space: must be a finite number, got inf"),
    (["--swap-space", "nan"], "argument --swap-space: must be a finite number, got nan"),
    (["--swap-space", "1e9"], "--swap-space 1e\\+09 GiB is more than this machine's .* GiB of memory"),
    (["--swap-space", "0"], "--preemption swap needs --swap-space > 0"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--range-ratio", "1"], "argument --range-ratio: must be in \\[0, 1\\), got 1"),
    (["--gpu-memory-utilization", "2"], "argument --gpu-memory-utilization: must be in \\(0, 1\\], got 2"),
    (["--num-pages", "1"], "argument --num-pages: must be >= 2, got 1"),
    (["--num-pages", HUGE], f"--num-pages {HUGE}: a pool of .* is more than this machine's"),
    (["--page-size", "12"], "argument --page-size: must be a power of two, got 12"),
    (["--dtype", "bfloat16", "--device", "cpu"], "--dtype bfloat16 runs on CUDA only: NumPy has no bfloat16"),
    (["--gpu-memory-utilization", "0.5", "--device", "cpu"], "--gpu-memory-utilization sizes the pool from free CUDA "
                                                              "memory, and this run is on the CPU \\(--device cpu\\)"),
])
def test_messages_name_the_flags_as_typed(capsys, argv, message):
    """Each message names the flag the user typed (no OverflowError, no 'a HostSwap is needed' for
    NaN, no NumPy 'expected non-negative integer' for --seed -1)."""
    assert main(["run", "--no-progress", "--num-prompts", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"pagemem( run)?: error: .*{message}.*\n", err), err


@pytest.mark.parametrize("argv, message", [
    (["--port", "-1"], "argument --port: must be in \\[0, 65535\\], got -1"),
    (["--port", "65536"], "argument --port: must be in \\[0, 65535\\], got 65536"),
    (["--max-waiting", "0"], "argument --max-waiting: must be > 0, got 0"),
    (["--num-pages", "abc"], "argument --num-pages: expected an int, got 'abc'"),
    (["--max-model-len", "-1"], "argument --max-model-len: must be > 0, got -1"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["--chat-template", "/no/such/file"], "--chat-template: no file at /no/such/file"),
])
def test_serve_refuses_bad_flags_before_it_loads_or_listens(capsys, monkeypatch, no_engine, no_listening, argv,
                                                            message):
    """A bad flag of pagemem serve is one line naming it, before the model loads (no_engine) and
    long before a socket is bound (no_listening): nothing is left to wait on."""
    monkeypatch.delenv("PAGEMEM_DEBUG", raising=False)
    assert main(["serve", "--port", "0", *argv]) == 2
    out, err = capsys.readouterr()
    assert re.fullmatch(f"pagemem( serve)?: error: {message}.*\n", err), err
    assert out == ""


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_a_chat_template_that_is_not_utf8_is_named(capsys, monkeypatch, no_engine, no_listening, tmp_path, command):
    """--chat-template pointing at bytes that are not UTF-8 text: one line naming the flag and the
    file, before the model loads."""
    monkeypatch.delenv("PAGEMEM_DEBUG", raising=False)
    bad = tmp_path / "t.jinja"
    bad.write_bytes(b"{{ messages }}\xff\xfe")
    extra = ["--port", "0"] if command == "serve" else ["--model", "random:tiny", "--device", "cpu"]
    assert main([command, *extra, "--chat-template", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"pagemem( {command})?: error: --chat-template: {re.escape(str(bad))} is not UTF-8 text "
                        r"\(invalid start byte at byte 14\)\n", err), err


def test_cuda_asked_for_where_there_is_none(capsys, monkeypatch):
    monkeypatch.setattr("pagemem.backend.cuda_unavailable_reason", lambda: "no CUDA device is visible")
    assert main(["run", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "pagemem: error: --device cuda: no CUDA device is visible\n"


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if the CLI builds an engine: what is checked before the run must be."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started")
    monkeypatch.setattr(engine, "LLM", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--json", "{folder}"], "--json {folder} is a folder; give a file name"),
    (["--json", "{root}/missing/s.json"], "--json {root}/missing/s.json: folder {root}/missing does not exist"),
    (["--json", "/sys/pagemem.json"], "--json /sys/pagemem.json cannot be written: Permission denied"),
    (["--plot", "{folder}"], "--plot {folder}"),
    (["--plot", "{root}/p.txt"], "--plot {root}/p.txt: matplotlib writes .*png.*, not .txt"),
])
def test_output_paths_are_checked_before_the_run(places, capsys, no_engine, argv, message):
    fill = lambda s: s.format(root=places, folder=places / "folder")  # noqa: E731
    assert main(["run", "--no-progress", *map(fill, argv)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"pagemem: error: {fill(message)}.*\n", err), err
    assert not (places / "missing").exists() and not list(places.glob("p.*"))


def test_plot_without_matplotlib_is_refused_before_the_run(places, capsys, no_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)       # import fails as if not installed
    assert main(["run", "--plot", str(places / "p.png")]) == 2
    assert capsys.readouterr().err.startswith("pagemem: error: --plot needs matplotlib (pip install 'pagemem[plot]')")


def test_a_config_without_hidden_size_is_one_line(places, capsys):
    model = places / "broken_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 300,
                                                   "num_attention_heads": 4, "num_hidden_layers": 2,
                                                   "intermediate_size": 64}))
    assert main(["run", "--model", str(model)]) == 2
    assert capsys.readouterr().err == f"pagemem: error: {model}/config.json: missing field 'hidden_size'\n"


def test_an_internal_error_keeps_its_traceback(monkeypatch, capsys):
    """A broken invariant is not a user's mistake: its RuntimeError, numbers and all, propagates
    (with or without PAGEMEM_DEBUG), where a user's mistake is one line unless PAGEMEM_DEBUG is set."""
    def corrupt(self, *args, **kwargs):
        raise RuntimeError("pool corrupted: page 7 has refcount 2, 1 holder")
    monkeypatch.setattr(engine.LLM, "generate", corrupt)
    for debug in (None, "1"):
        if debug:
            monkeypatch.setenv("PAGEMEM_DEBUG", debug)
        with pytest.raises(RuntimeError, match="page 7 has refcount 2"):
            main(["run", "--no-progress", "--num-prompts", "2"])
    with pytest.raises(ValueError, match="unknown preset"):
        main(["run", "--model", "random:nope"])                 # PAGEMEM_DEBUG=1: the user error raised too


def test_help_shows_every_default_and_no_markup():
    """Every flag of every subcommand says its default; one of None says in words what happens
    without the flag, and a required flag, which has none, shows none."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) == set(sub.choices)
    texts = [parser.format_help()]
    texts += [sub.choices[c].format_help() for c in COMMANDS]
    helps = {}
    for command in COMMANDS:
        p = sub.choices[command]
        for action in p._actions:
            if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS:
                shown = helps[command, action.option_strings[0]] = \
                    p._get_formatter()._expand_help(action) if action.help else ""
                where = f"{command} {action.option_strings[0]}: {shown!r}"
                if action.required:
                    assert shown and "default" not in shown, where
                else:
                    assert "default" in shown and "default: None" not in shown, where
    assert not any("``" in t for t in texts)
    assert "(default: 16)" in sub.choices["run"].format_help()            # --page-size
    assert helps["chat", "--max-tokens"].endswith("(default: 256)")
    assert helps["simulate", "--seed"].endswith("(default: 0)")            # a falsy default shown too
    assert helps["calibrate", "--batch-sizes"].endswith("(default: 1,8,32,64,128,256)")   # as it is typed


@pytest.mark.parametrize("argv", [["run", "--swap-space", "inf"], ["run", "--json", "/"], ["simulate", "--trace", "/"],
                                  ["calibrate", "--out", "/", "--device", "cpu"], ["run", "--model", "random:nope"],
                                  ["serve", "--port", "-1"],
                                  ["serve", "--port", "0", "--chat-template", "/no/such/file"]])
def test_a_real_process_prints_one_line(argv):
    """(A serve that got past its checks would listen until its timeout, killed, and fail, not hang.)"""
    timeout = 30 if argv[0] == "serve" else 120
    proc = subprocess.run([sys.executable, "-m", "pagemem.models.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
