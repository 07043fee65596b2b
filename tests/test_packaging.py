"""The distribution installs one top-level import name, ``pagemem``, and lives beside transformers
(whose dependency ``kernels`` owns that top-level name)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_and_pagemem_kernels_in_one_process(tmp_path):
    """From a directory outside the checkout, as a user runs it: both import, and the names resolve
    to their own packages."""
    code = ("import transformers, pagemem.kernels, pagemem.models, sys\n"
            "from pagemem.kernels import paged_decode\n"
            "assert paged_decode.__module__ == 'pagemem.kernels', paged_decode.__module__\n"
            "assert 'CUDAProperties' not in vars(pagemem.kernels)\n"
            "other = sys.modules.get('kernels')\n"
            "assert other is None or 'pagemem' not in (other.__file__ or ''), other\n"
            "from transformers import LlamaConfig\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_pytest_process_sees_hf_kernels_not_ours():
    """Under ``python -m pytest`` from the repository root, ``kernels`` is never this project's."""
    import transformers  # noqa: F401  (imports Hugging Face's kernels where it is installed)
    from pagemem.kernels import paged_decode
    assert Path(sys.modules["pagemem.kernels"].__file__).parent == ROOT / "kernels" or "site-packages" in \
        sys.modules["pagemem.kernels"].__file__
    assert paged_decode.__module__ == "pagemem.kernels"
    theirs = sys.modules.get("kernels")
    assert theirs is None or Path(theirs.__file__).parent != ROOT / "kernels"


def test_installed_distribution_declares_only_pagemem():
    dist = importlib.metadata.distribution("pagemem")
    assert dist.read_text("top_level.txt").split() == ["pagemem"]
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    assert [(ep.name, ep.value) for ep in scripts] == [("pagemem", "pagemem.models.cli:main")]


@pytest.mark.slow
def test_built_wheel_ships_only_pagemem(tmp_path):
    """Build a regular wheel from a copy of the sources (no network: the installed setuptools) and
    list its top-level names: one package, with the folders mapped under it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("pagemem", "kernels", "models"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    # A script outside the sources: ``python -c`` would put the sources' kernels/ first on sys.path,
    # where setuptools' plugin loading would find it instead of Hugging Face's kernels.
    script = tmp_path / "build.py"
    script.write_text(f"import setuptools.build_meta as b\nprint(b.build_wheel({str(out)!r}))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=src, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = proc.stdout.split()[-1]
    files = zipfile.ZipFile(out / name).namelist()
    top = {f.split("/")[0] for f in files if not f.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"pagemem"}, top
    for module in ("pagemem/__init__.py", "pagemem/kernels/__init__.py", "pagemem/kernels/reference.py",
                   "pagemem/models/__init__.py", "pagemem/models/cli.py"):
        assert module in files
