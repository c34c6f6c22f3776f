"""A local directory as a source and a sink (:mod:`filestores` has the rules): the connection's
``path``; a source reads its files matching ``pattern``, a sink sees all of its own whatever the
pattern. Files are written under a temporary name, fsynced, then linked to their name (a link, unlike a
rename, never replaces a file already there), so a file is whole once it has its name, even across a
crash of the machine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from joey_connector_bridge.connectors import Unavailable, register_sink, register_source
from joey_connector_bridge.filestores import Entry, FileSink, FileSource, Location


class Directory(Location):
    def __init__(self, details: Mapping[str, Any]) -> None:
        self._path = Path(details["path"])

    def list(self) -> list[Entry]:
        try:
            with os.scandir(self._path) as entries:
                return [
                    Entry(e.name, s.st_size, s.st_mtime_ns)
                    for e in entries
                    if e.is_file() and (s := e.stat())
                ]
        except OSError as exc:
            raise Unavailable(f"cannot list {self._path}: {exc.strerror}") from None

    def read(self, name: str) -> bytes:
        try:
            return (self._path / name).read_bytes()
        except OSError as exc:
            raise Unavailable(f"cannot read {self._path / name}: {exc.strerror}") from None

    def put(self, name: str, data: bytes) -> bool:
        final = self._path / name
        try:
            # A name of its own: two members of a sink's group may write one file during a rebalance.
            with tempfile.NamedTemporaryFile(dir=self._path, prefix=f".{name}.", suffix=".tmp") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
                try:
                    os.link(out.name, final)
                except FileExistsError:
                    return False
            directory = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(directory)  # the link itself survives a crash of the machine
            finally:
                os.close(directory)
        except OSError as exc:
            raise Unavailable(f"cannot write {final}: {exc.strerror}") from None
        return True


@register_source
class FilesSource(FileSource):
    type = "files"
    location = Directory


@register_sink
class FilesSink(FileSink):
    type = "files"
    location = Directory
