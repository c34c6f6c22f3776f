"""Virtual environments of orchestrations: one per requirements, built on top of Joey's own packages.

An environment is ``<dir>/envs/<key>``: a venv (no pip of its own) whose site-packages holds a .pth
that adds the orchestrator's own site-packages after it, so ``import joey`` works and every package
Joey ships is there, plus what ``requirements.txt`` installs (with the orchestrator's pip, run for the
venv's interpreter: ``pip --python``). The key is the sha256 of the requirements (with the interpreter's
version and Joey's environment's path), and of the zip too unless every line is a plain requirement of
an index (``pandas==2.2``, parsed by ``packaging``): an option, an included file (``-r base.txt``), a path
(``vendor/pkg``, ``-e ./pkg``), a URL or ``--find-links wheels`` may install files of the zip, which
change while the line does not. So versions, and workspaces, share an environment only when nothing in
it came from a zip.

pip runs in the orchestration's extracted directory with an environment of its own: no ``JOEY_*``
setting, database URL or token reaches a package's build scripts. Builds are atomic (a temporary
directory renamed into place) and, on one machine, one at a time per key (a file lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from joey_core import orchestrations as core

log = logging.getLogger(__name__)

MAX_LOG_CHARS = 200_000
_COMMENT = re.compile(r"(^|\s)#.*")
# What pip may see of the orchestrator's environment: where to find programs and packages, never a secret.
_PASSED = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
_PASSED_PREFIXES = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


class PackagingFailed(Exception):
    """The environment could not be built; ``log`` has pip's output and the reason."""

    def __init__(self, reason: str, log_text: str) -> None:
        super().__init__(reason)
        self.log = log_text


@dataclass(frozen=True)
class Environment:
    python: Path
    log: str


def requirements_key(code: Path, zip_sha256: str) -> str:
    requirements = code / core.REQUIREMENTS
    text = requirements.read_bytes() if requirements.is_file() else b""
    # The interpreter and Joey's environment too: an environment is built on both.
    digest = hashlib.sha256(f"{sys.version}\n{sys.prefix}\n".encode() + text)
    if not all(_from_an_index(line) for line in text.decode(errors="replace").splitlines()):
        digest.update(zip_sha256.encode())
    return digest.hexdigest()


def _from_an_index(line: str) -> bool:
    """Whether the line of requirements.txt installs nothing but a package of the index: blank, a
    comment, or a requirement without a URL (anything else, to pip, may name files of the zip)."""
    text = _COMMENT.sub("", line).strip()
    if not text:
        return True
    try:
        return Requirement(text).url is None
    except InvalidRequirement:
        return False


def _pip_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASSED or k.startswith(_PASSED_PREFIXES)}
    return env | {"HOME": str(home), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


class Environments:
    def __init__(self, root: Path, pip_args: list[str], timeout_s: float) -> None:
        self._root = root / "envs"
        self._root.mkdir(parents=True, exist_ok=True)
        self._pip_args = pip_args
        self._timeout_s = timeout_s

    def ensure(self, code: Path, zip_sha256: str) -> Environment:
        """The environment of the orchestration extracted in ``code``, built unless it exists."""
        key = requirements_key(code, zip_sha256)
        target = self._root / key
        with self._locked(key):
            if (target / "built.log").is_file():
                return Environment(target / "bin" / "python", (target / "built.log").read_text())
            building = self._root / f"{key}.building-{secrets.token_hex(4)}"
            try:
                text = self._build(building, code)
                (building / "built.log").write_text(text)
                os.replace(building, target)
            finally:
                shutil.rmtree(building, ignore_errors=True)
        log.info("built environment %s", key)
        return Environment(target / "bin" / "python", text)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with open(self._root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _build(self, building: Path, code: Path) -> str:
        lines = [f"environment on Python {sys.version.split()[0]}, with Joey's packages"]
        self._run([sys.executable, "-m", "venv", "--without-pip", str(building)], code, lines)
        python = building / "bin" / "python"
        site = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        # After the venv's own site-packages: a task's requirement wins over the package Joey ships.
        joey_sites = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (site / "_joey.pth").write_text(
            "".join(f"import site; site.addsitedir({path!r})\n" for path in joey_sites)
        )
        if not (code / core.REQUIREMENTS).is_file():
            lines.append(f"no {core.REQUIREMENTS}: Joey's packages only")
            return "\n".join(lines)
        pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input"]
        self._run([*pip, *self._pip_args, "-r", core.REQUIREMENTS], code, lines)
        return "\n".join(lines)[-MAX_LOG_CHARS:]

    def _run(self, command: list[str], code: Path, lines: list[str]) -> None:
        shown = " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
        lines.append(f"$ {shown}")
        # A session and process group of its own: on a timeout the group is killed, pip's build
        # subprocesses (a setup.py compiling, a backend hook) with it, not pip alone.
        with subprocess.Popen(
            command,
            cwd=code,
            env=_pip_environment(code),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=self._timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                lines.append("".join(process.communicate()).rstrip())
                reason = f"packaging took longer than {self._timeout_s:g} s (JOEY_PACKAGING_TIMEOUT_S)"
                raise PackagingFailed(
                    reason, "\n".join([*lines, f"error: {reason}"])[-MAX_LOG_CHARS:]
                ) from None
        lines.append((stdout + stderr).rstrip())
        if process.returncode != 0:
            errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
            reason = errors[-1] if errors else f"{shown} exited with {process.returncode}"
            raise PackagingFailed(reason, "\n".join([*lines, f"error: {reason}"])[-MAX_LOG_CHARS:])
