"""A model version's extra files on the user's side: collected from paths for an upload, and downloaded
into a directory, each checked against its sha256 and kept inside that directory."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from joey_core.models import ArtifactFile, artifact_name_problem

CHUNK_BYTES = 1 << 20
ArtifactPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""A directory (its files, named relative to it), or a list of files (named by their file names) and
directories (their files, named under the directory's name)."""


def collect(artifacts: ArtifactPaths) -> list[tuple[str, Path]]:
    """The (name, path) of every file ``artifacts`` names, in name order; ValueError for a name the
    registry would refuse, or given twice."""
    if isinstance(artifacts, str | os.PathLike):
        root = Path(artifacts)
        found = _tree(root, "") if root.is_dir() else [(root.name, root)]
    else:
        found = []
        for item in map(Path, artifacts):
            found += _tree(item, f"{item.resolve().name}/") if item.is_dir() else [(item.name, item)]
    named: dict[str, Path] = {}
    for name, path in found:
        if not path.is_file():
            raise ValueError(f"artifact {str(path)!r} is not a file or a directory")
        problem = artifact_name_problem(name)
        if problem:
            raise ValueError(f"artifact {str(path)!r} cannot be named {name!r}: {problem}")
        if name in named:
            raise ValueError(f"two artifacts would be named {name!r}: {named[name]} and {path}")
        named[name] = path
    return sorted(named.items())


def _tree(root: Path, prefix: str) -> list[tuple[str, Path]]:
    return [(prefix + p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]


def manifest(files: list[tuple[str, Path]]) -> list[ArtifactFile]:
    """Name, size and sha256 of each file, read once here and once more when sent (the registry
    refuses a file whose bytes changed in between)."""
    described = []
    for name, path in files:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as stream:
            while block := stream.read(CHUNK_BYTES):
                digest.update(block)
                size += len(block)
        described.append(ArtifactFile(name, size, digest.hexdigest()))
    return described


def blocks(files: list[tuple[str, Path]]) -> Iterator[bytes]:
    for _, path in files:
        with path.open("rb") as stream:
            while block := stream.read(CHUNK_BYTES):
                yield block


def download(
    files: Iterable[ArtifactFile], directory: str | os.PathLike[str], fetch: Callable[[str], Iterable[bytes]]
) -> list[Path]:
    """Write each file under ``directory`` (created if needed; a file there of the same name is replaced)
    from ``fetch(sha256)``; a name that would leave the directory, or bytes that are not what their
    sha256 says, raise ValueError and leave that file unwritten."""
    root = Path(directory).resolve()
    written = []
    for f in files:
        problem = artifact_name_problem(f.name)
        target = (root / f.name).resolve()
        if problem or not target.is_relative_to(root):
            raise ValueError(
                f"refused to write artifact {f.name!r} under {root}: {problem or 'it leaves it'}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for data in fetch(f.sha256):
                    digest.update(data)
                    out.write(data)
            if digest.hexdigest() != f.sha256:
                raise ValueError(
                    f"artifact {f.name!r} downloaded with sha256 {digest.hexdigest()}, not {f.sha256}; "
                    "not written"
                )
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
        written.append(target)
    return written
