"""What an upload says besides its model: lineage (description, source, metadata) and the manifest of
the extra files the version carries, checked before any byte is received, and the files' bytes staged
against that manifest."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from joey_core.models import ArtifactFile, artifact_name_problem
from joey_registry.artifacts import SHA256_PATTERN
from joey_registry.domain import Lineage, UploadHeader
from joey_registry.errors import InvalidArgument

MAX_DESCRIPTION_CHARS = 10_000
MAX_SOURCE_CHARS = 1_000
MAX_METADATA_BYTES = 64 * 1024

StagedFile = tuple[ArtifactFile, Path]


def check_lineage(header: UploadHeader) -> Lineage:
    for what, text, limit in (
        ("description", header.description, MAX_DESCRIPTION_CHARS),
        ("source", header.source, MAX_SOURCE_CHARS),
    ):
        if len(text) > limit:
            raise InvalidArgument(f"the {what} is {len(text)} characters long; at most {limit} are kept")
    return Lineage(header.description, header.source.strip(), _metadata(header.metadata_json))


def _metadata(text: str) -> dict[str, Any]:
    if not text:
        return {}
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES} are kept")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


def check_manifest(files: tuple[ArtifactFile, ...], max_count: int, max_bytes: int) -> None:
    """Refuse a manifest over the limits, with a name that could leave the directory it is downloaded
    to, twice the same name, or a name that is also another's directory (no download could hold both)."""
    if len(files) > max_count:
        raise InvalidArgument(
            f"{len(files)} artifact files; a model version carries at most {max_count} (JOEY_MAX_ARTIFACTS)"
        )
    total = sum(f.size_bytes for f in files)
    if total > max_bytes:
        raise InvalidArgument(
            f"the artifact files hold {total} bytes; a model version carries at most {max_bytes} "
            "(JOEY_MAX_ARTIFACTS_BYTES)"
        )
    names = {f.name for f in files}
    seen: set[str] = set()
    for f in files:
        problem = artifact_name_problem(f.name)
        if problem:
            raise InvalidArgument(f"artifact name {f.name!r} refused: {problem}")
        if f.name in seen:
            raise InvalidArgument(f"artifact name {f.name!r} is given twice")
        seen.add(f.name)
        if f.size_bytes < 0:
            raise InvalidArgument(f"artifact {f.name!r} declares a negative size ({f.size_bytes})")
        if not SHA256_PATTERN.match(f.sha256):
            raise InvalidArgument(
                f"artifact {f.name!r}: sha256 must be 64 lowercase hex characters, got {f.sha256!r}"
            )
        parts = f.name.split("/")
        for directory in ("/".join(parts[:i]) for i in range(1, len(parts))):
            if directory in names:
                raise InvalidArgument(
                    f"artifact {directory!r} is both a file and the directory of {f.name!r}"
                )


@contextmanager
def staged_files(
    files: tuple[ArtifactFile, ...], chunks: Iterable[bytes], staging: Path
) -> Iterator[list[StagedFile]]:
    """The files' bytes (``chunks``: all of them, in manifest order) written to staging files, each
    checked against its declared size and sha256; the staging files are gone when the block ends."""
    staged: list[StagedFile] = []
    try:
        stream = iter(chunks)
        pending = memoryview(b"")
        for f in files:
            fd, name = tempfile.mkstemp(dir=staging, suffix=".artifact")
            path = Path(name)
            staged.append((f, path))
            digest = hashlib.sha256()
            left = f.size_bytes
            with os.fdopen(fd, "wb") as out:
                while left:
                    if not pending:
                        chunk = next(stream, None)
                        if chunk is None:
                            raise InvalidArgument(
                                f"the upload ended {f.size_bytes - left} bytes into artifact {f.name!r}, "
                                f"which declares {f.size_bytes}; nothing was stored"
                            )
                        pending = memoryview(chunk)
                    piece, pending = pending[:left], pending[left:]
                    digest.update(piece)
                    out.write(piece)
                    left -= len(piece)
            if digest.hexdigest() != f.sha256:
                raise InvalidArgument(
                    f"artifact {f.name!r} arrived with sha256 {digest.hexdigest()}, not the declared "
                    f"{f.sha256}: it changed while being sent, or was corrupted; nothing was stored"
                )
        if pending or any(chunk for chunk in stream):
            raise InvalidArgument(
                "the upload sent more artifact bytes than its files declare; nothing was stored"
            )
        yield staged
    finally:
        for _, path in staged:
            path.unlink(missing_ok=True)
