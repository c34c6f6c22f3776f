"""The credentials file: which token the SDK and the CLI present to which registry.

``$JOEY_CREDENTIALS``, else ``$XDG_CONFIG_HOME/joey/credentials`` (``~/.config/joey/credentials``): a JSON
object keyed by registry address (``host:port`` as the client is told it), each entry
``{"username": ..., "token": ...}``. `joey login` and `joey up` write it, `joey logout` removes an entry.

A token is as good as a password, so the file is treated like an ssh key: written with mode 0600 in a
directory made with mode 0700, replaced atomically (a crash never leaves half a file, a reader never sees
one), and refused when group or others may read it or another user owns it, rather than trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_MODE = 0o600
DIR_MODE = 0o700


class CredentialsError(Exception):
    """The credentials file cannot be used: unreadable, malformed, or open to other users."""


@dataclass(frozen=True)
class Credential:
    """Who is logged in to one registry, and with which token (never shown in a repr)."""

    username: str
    token: str = field(repr=False)
    api_token_name: str | None = None
    """The name of an API token (`joey up` stores one), which logging out revokes by name; None for a
    session, which logging out ends."""


def default_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the credentials file is: ``JOEY_CREDENTIALS``, else under ``XDG_CONFIG_HOME`` (default
    ``~/.config``)."""
    if environ.get("JOEY_CREDENTIALS"):
        return Path(environ["JOEY_CREDENTIALS"]).expanduser()
    config = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "joey" / "credentials"


class CredentialsFile:
    """Read and change the credentials file at ``path`` (default: :func:`default_path`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()

    def get(self, registry_addr: str) -> Credential | None:
        """The entry for ``registry_addr``; None without one (or without a file)."""
        return self._credential(registry_addr, self._read().get(registry_addr))

    def put(self, registry_addr: str, credential: Credential) -> None:
        """Store ``credential`` for ``registry_addr``, replacing any entry it had."""
        with self._locked():
            entries = self._read()
            entry = {"username": credential.username, "token": credential.token}
            if credential.api_token_name is not None:
                entry["api_token_name"] = credential.api_token_name
            entries[registry_addr] = entry
            self._write(entries)

    def remove(self, registry_addr: str) -> bool:
        """Remove the entry for ``registry_addr``; whether there was one."""
        with self._locked():
            entries = self._read()
            if entries.pop(registry_addr, None) is None:
                return False
            self._write(entries)
            return True

    def _credential(self, registry_addr: str, entry: Any) -> Credential | None:
        if entry is None:
            return None
        try:
            name = entry.get("api_token_name")
            return Credential(
                str(entry["username"]), str(entry["token"]), None if name is None else str(name)
            )
        except (KeyError, TypeError):
            raise CredentialsError(
                f"the entry for {registry_addr} in {self.path} is malformed; log in again with `joey login`"
            ) from None

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read the credentials file {self.path}: {exc.strerror}") from None
        with os.fdopen(fd) as f:
            self._check_private(os.fstat(f.fileno()))
            try:
                entries = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entries = None
        if not isinstance(entries, dict):
            raise CredentialsError(
                f"the credentials file {self.path} is not a JSON object; remove it and log in again "
                "with `joey login`"
            )
        return entries

    def _check_private(self, st: os.stat_result) -> None:
        # As ssh does with a private key: a token others could have read is refused, not used.
        if st.st_uid != os.getuid():
            raise CredentialsError(f"the credentials file {self.path} belongs to another user; not using it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise CredentialsError(
                f"the credentials file {self.path} may be read by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); restrict it with `chmod 600 {self.path}`, or remove "
                "it and log in again"
            )

    def _write(self, entries: dict[str, Any]) -> None:
        # A new file in the same directory, renamed over the old: readers see the old or the new file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".credentials.", suffix=".tmp")
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's lock while reading and rewriting, so that two logins at once both land."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY)
        except OSError as exc:
            raise CredentialsError(f"cannot write the credentials file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
