"""What the orchestrator's tests build: packages whose build does something first, and process checks."""

from __future__ import annotations

import os
from pathlib import Path


def package_with_backend(code: Path, name: str, first: str) -> None:
    """``vendor/<name>`` in the orchestration ``code``, its requirement: a package whose in-tree build
    backend runs the Python ``first`` when pip loads it (in a process of pip's), then is setuptools'."""
    package = code / "vendor" / name
    package.mkdir(parents=True)
    (package / f"{name}_backend.py").write_text(f"{first}\nfrom setuptools.build_meta import *\n")
    (package / "pyproject.toml").write_text(
        f'[build-system]\nrequires = []\nbuild-backend = "{name}_backend"\nbackend-path = ["."]\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\n[tool.setuptools]\npy-modules = []\n'
    )
    (code / "requirements.txt").write_text(f"./vendor/{name}\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its parent is gone for good
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
