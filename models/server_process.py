"""ServerProcess: ``pagemem serve`` in a child process on a free loopback port (tests, benchmarks).

The child binds port 0 and prints the port it got, so two servers never race for one port; its
output goes to a log file (a pipe nobody reads could fill and stall it). Ready means that
``GET /health`` answered 200. Standard library only.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_PORT = re.compile(r"listening on (http://[\w.\-\[\]:]+)")


class ServerProcess:
    """``with ServerProcess(["--model", "random:tiny"], log) as srv:`` serves at ``srv.url``
    (``srv.base_url`` is the ``/v1`` root for OpenAI clients) and is stopped on exit."""

    def __init__(self, args: list[str], log_path: str | Path, *, startup_timeout: float = 300.0) -> None:
        self.args, self.log_path, self.startup_timeout = list(args), Path(log_path), startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "pagemem.models.cli", "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while not self.url:
            self._wait_a_little(deadline, "print its address")
            found = _PORT.search(self.log())
            self.url = found.group(1) if found else ""
        while not self._healthy():
            self._wait_a_little(deadline, "answer /health")
        return self

    def _wait_a_little(self, deadline: float, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"pagemem serve exited with {self.proc.returncode} before it could {what}:\n"
                               f"{self.log()[-4000:]}")
        if time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"pagemem serve did not {what} within {self.startup_timeout} s:\n{self.log()[-4000:]}")
        time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """Interrupt the server (as Ctrl-C would), kill it if it lingers; its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)     # uvicorn shuts down, then the CLI exits 130 with atexit run
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
