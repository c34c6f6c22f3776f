"""An S3 prefix (any S3-compatible store) as a source and a sink (:mod:`filestores` has the rules),
through pyarrow's S3 filesystem, the one the connection's test uses: its credentials only, never the
host's. Every object under the prefix is a file, named by its key below the prefix; an object appears
whole once its upload completes, so S3 needs no rename. An object is created only when no object has its
key, checked just before the upload: pyarrow's S3 filesystem cannot send ``If-None-Match: *``, so two
writers of one key at the same moment (two members of a sink's group during a rebalance, writing the
same rows) may both upload; a key written in another life of the topic is never replaced."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyarrow import fs

from joey_connector_bridge.connectors import Unavailable, register_sink, register_source
from joey_connector_bridge.filestores import Entry, FileSink, FileSource, Location
from joey_core.connections.base import first_line
from joey_core.connections.s3 import filesystem

TIMEOUT_S = 10.0
"""Longest wait for one request: past it the step is retried, the bridge saying why."""


class Prefix(Location):
    def __init__(self, details: Mapping[str, Any]) -> None:
        self._store = filesystem(details, TIMEOUT_S)
        prefix = str(details.get("prefix", "")).strip("/")
        self._base = f"{details['bucket']}/{prefix}".rstrip("/")

    def _failed(self, doing: str, exc: Exception) -> Unavailable:
        # pyarrow's messages name the bucket and key, never the credentials.
        return Unavailable(f"cannot {doing}: {first_line(exc)}")

    def list(self) -> list[Entry]:
        selector = fs.FileSelector(self._base, recursive=True, allow_not_found=True)
        try:
            infos = self._store.get_file_info(selector)
        except (OSError, ValueError) as exc:
            raise self._failed(f"list s3://{self._base}", exc) from None
        return [
            Entry(i.path[len(self._base) + 1 :], i.size or 0, i.mtime_ns or 0)
            for i in infos
            if i.type == fs.FileType.File
        ]

    def read(self, name: str) -> bytes:
        try:
            with self._store.open_input_stream(f"{self._base}/{name}") as stream:
                return bytes(stream.read())
        except (OSError, ValueError) as exc:
            raise self._failed(f"read s3://{self._base}/{name}", exc) from None

    def put(self, name: str, data: bytes) -> bool:
        key = f"{self._base}/{name}"
        try:
            if self._store.get_file_info(key).type != fs.FileType.NotFound:
                return False
            with self._store.open_output_stream(key) as stream:
                stream.write(data)
        except (OSError, ValueError) as exc:
            raise self._failed(f"write s3://{key}", exc) from None
        return True


@register_source
class S3Source(FileSource):
    type = "s3"
    location = Prefix


@register_sink
class S3Sink(FileSink):
    type = "s3"
    location = Prefix
