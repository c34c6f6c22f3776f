"""Content-addressed storage of model artifacts, behind a small pluggable interface."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from joey_registry.errors import InvalidArgument
from joey_registry.settings import RegistrySettings

log = logging.getLogger(__name__)

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore(ABC):
    """Stores artifacts by the sha256 of their bytes; storing the same bytes twice keeps one copy."""

    def staging_dir(self) -> Path:
        """Where uploads are spooled before :meth:`put`; stores override it to make ``put`` a rename."""
        return Path(tempfile.gettempdir())

    @abstractmethod
    def put(self, sha256: str, source: Path) -> bool:
        """Take ownership of ``source`` (whose sha256 the caller computed); return True if it was new."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """Open the artifact for reading; FileNotFoundError if absent."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove an artifact (used to undo a put whose metadata could not be committed)."""

    def read_chunks(self, sha256: str, chunk_size: int) -> Iterator[bytes]:
        with self.open(sha256) as stream:
            while chunk := stream.read(chunk_size):
                yield chunk


class FilesystemArtifactStore(ArtifactStore):
    """``<root>/sha256/<ab>/<sha256>``; uploads are staged in ``<root>/staging`` on the same filesystem
    so that storing is an atomic rename and a reader never sees a partial file."""

    STALE_STAGING_S = 24 * 3600

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / "staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()

    def staging_dir(self) -> Path:
        return self._staging

    def _path(self, sha256: str) -> Path:
        if not SHA256_PATTERN.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, sha256: str, source: Path) -> bool:
        target = self._path(sha256)
        if target.exists():
            source.unlink(missing_ok=True)
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(source, target)
        return True

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def open(self, sha256: str) -> BinaryIO:
        return open(self._path(sha256), "rb")

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def _remove_stale_staging(self) -> None:
        # Leftovers of uploads interrupted by a crash; a day is far longer than any upload.
        cutoff = time.time() - self.STALE_STAGING_S
        for path in self._staging.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                log.info("removed stale staged upload %s", path)


@contextmanager
def spooled(
    chunks: Iterable[bytes], staging: Path, limit: int, setting: str
) -> Iterator[tuple[Path, str, int]]:
    """The chunks written to a staging file while hashing, never held in memory, the file removed at the
    block's end (unless :meth:`ArtifactStore.put` took it); beyond ``limit`` bytes InvalidArgument."""
    fd, name = tempfile.mkstemp(dir=staging, suffix=".upload")
    path = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise InvalidArgument(f"upload exceeds the limit of {limit} bytes ({setting})")
                digest.update(chunk)
                out.write(chunk)
        yield path, digest.hexdigest(), size
    finally:
        path.unlink(missing_ok=True)


STORES: dict[str, Callable[[RegistrySettings], ArtifactStore]] = {
    "filesystem": lambda settings: FilesystemArtifactStore(settings.artifact_dir),
}


def create_store(settings: RegistrySettings) -> ArtifactStore:
    try:
        factory = STORES[settings.artifact_store]
    except KeyError:
        raise ValueError(
            f"unknown artifact store {settings.artifact_store!r} (JOEY_ARTIFACT_STORE); "
            f"available: {', '.join(sorted(STORES))}"
        ) from None
    return factory(settings)
