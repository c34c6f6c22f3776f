"""Stores of files as sources and sinks, whatever holds the files: a local directory (:mod:`files`) and an
S3 prefix (:mod:`s3`) each give a :class:`Location` (list, read, put atomically); reading CSV, JSON
lines and Parquet, and writing Parquet, is done here once, with pyarrow.

Source: the files are taken in name order (names, not times: an S3 listing is by name, and a clock
skewed between writers must not reorder them), each whole, row by row; its position is ``[file,
row]`` of the last row acknowledged, its request ids ``<source>/<file>/<row>``. A file is read once
it is visible under its final name, so a writer must make it appear whole: write it under a name
starting with ``.`` or ``_``, or ending with ``.tmp``, or in such a folder (never read), then rename
it (S3 objects appear whole anyway). A file named before the position is never read, like a Postgres
row keyed below it.

Sink: rows are held per partition and written as one Parquet file once it holds ``roll_rows`` rows or
its first row is ``roll_seconds`` old, named ``<topic>-<partition>-<first offset>-<last offset>-<first
timestamp>.parquet`` (offsets zero-padded to 20 digits, so name order is offset order within one life of
the topic; the first row's Kafka timestamp, in ms, tells lives apart: a topic deleted and created again,
or an embedded broker restarted, numbers its offsets from 0 again); the partition's offsets are committed
up to the first row still held. A replay after a crash starts at the committed offset, the first row of
a file not written or of one written but not committed; such a leftover is found by its name (its first
offset and timestamp: those of the replay's first row) and the rows rolled at its last offset again, so
the replay writes the same file again. A file is only ever created, never replaced: one already there
under the name is kept when it holds the same rows (the same first request id and row count: the
leftover), and otherwise stops the sink, saying so, rather than overwrite results of another life.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from joey_connector_bridge.connectors import (
    Bridge,
    Partition,
    ResultRow,
    Sink,
    Source,
    SourceRecord,
    Unavailable,
)
from joey_core.connections.base import ROLL_ROWS, ROLL_SECONDS, first_line

log = logging.getLogger(__name__)

FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""A file's format by its extension, when the connection names none."""

RESULTS_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("source_key", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("outputs", pa.string()),
        ("error", pa.string()),
        ("pipeline_version", pa.int64()),
    ]
)
"""The sink's columns, as the Postgres sink's (outputs as JSON text)."""

_RESULT_FILE = re.compile(
    r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})-(?P<stamp>\d+)\.parquet$"
)


@dataclass(frozen=True)
class Entry:
    name: str
    """Relative to the location: what the position and request ids name."""
    size: int
    mtime_ns: int


def in_progress(name: str) -> bool:
    """Whether a file is one still being written, by the naming rule writers follow (for a key below
    an S3 prefix, any part of it: ``_temporary/...``)."""
    return any(part.startswith((".", "_")) or part.endswith(".tmp") for part in name.split("/"))


class Location(ABC):
    """Where a store's files are. Failures raise Unavailable naming the file, never a secret."""

    @abstractmethod
    def __init__(self, details: Mapping[str, Any]) -> None:
        """The place the connection's details name; nothing is reached yet."""

    @abstractmethod
    def list(self) -> list[Entry]:
        """The files there (every one: :func:`in_progress` ones and any the connection's ``pattern``
        leaves out too, since a sink must see all of its own)."""

    @abstractmethod
    def read(self, name: str) -> bytes: ...

    @abstractmethod
    def put(self, name: str, data: bytes) -> bool:
        """Create ``name`` whole or not at all (readers never see part of it); False, leaving it as it
        is, when a file has that name already."""


class FileStore:
    """A source or a sink over a :class:`Location`: each store's module names its own."""

    location: ClassVar[type[Location]]


def _format_of(name: str, details: Mapping[str, Any]) -> str | None:
    if details.get("format"):
        return str(details["format"])
    dot = name.rfind(".")
    return FORMATS.get(name[dot:].lower()) if dot >= 0 else None


def _csv_cell(value: Any) -> Any:
    # CSV has no arrays: a cell holding a JSON array is one, a tensor.
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_rows(data: bytes, file_format: str) -> list[dict[str, Any]]:
    """The rows of a file's bytes; ValueError (pyarrow's ArrowInvalid) when they are not that format."""
    buffer = pa.BufferReader(data)
    if file_format == "csv":
        rows = pyarrow.csv.read_csv(buffer).to_pylist()
        return [{k: _csv_cell(v) for k, v in row.items()} for row in rows]
    if file_format == "jsonl":
        return pyarrow.json.read_json(buffer).to_pylist()  # type: ignore[no-any-return]
    return pq.read_table(buffer).to_pylist()  # type: ignore[no-any-return]


class FileSource(FileStore, Source):
    """Rows of the files of a location matching the connection's ``pattern`` (a glob), in name order."""

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._where = self.location(details)
        self._pattern = str(details.get("pattern") or "*")
        self._cached: tuple[Entry, list[dict[str, Any]]] | None = None
        """The file being read, parsed once however many batches it takes."""
        self._counts: dict[Entry, int] = {}

    def _files(self, after: Any) -> list[Entry]:
        """The readable files from the position's (included) on, in name order."""
        start = after[0] if after else None
        found = [
            e
            for e in self._where.list()
            if not in_progress(e.name)
            and fnmatch.fnmatch(e.name, self._pattern)
            and _format_of(e.name, self.details)
            and (start is None or e.name >= start)
        ]
        return sorted(found, key=lambda e: e.name)

    def _parse(self, entry: Entry) -> list[dict[str, Any]]:
        file_format = _format_of(entry.name, self.details)
        assert file_format is not None
        try:
            rows = parse_rows(self._where.read(entry.name), file_format)
        except (ValueError, pa.ArrowException) as exc:
            # Not skipped: the source waits, saying why, until the file is mended or removed.
            raise Unavailable(f"cannot read {entry.name} as {file_format}: {first_line(exc)}") from None
        self._counts[entry] = len(rows)
        return rows

    def _rows(self, entry: Entry) -> list[dict[str, Any]]:
        if self._cached is None or self._cached[0] != entry:
            self._cached = (entry, self._parse(entry))
        return self._cached[1]

    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        found: list[SourceRecord] = []
        for entry in self._files(after):
            rows = self._rows(entry)
            first = after[1] + 1 if after and entry.name == after[0] else 0
            for i in range(first, min(len(rows), first + limit - len(found))):
                found.append(SourceRecord.of(f"{entry.name}/{i}", [entry.name, i], rows[i]))
            if len(found) >= limit:
                break
        return found

    def lag(self, after: Any) -> int:
        behind = 0
        for entry in self._files(after):
            if entry not in self._counts:
                self._parse(entry)  # counted once, and the file being read stays parsed
            rows = self._counts[entry]
            behind += rows - (after[1] + 1) if after and entry.name == after[0] else rows
        return behind


@dataclass
class _Held:
    """A partition's rows not written yet, and the files a crashed predecessor may have left: (first
    offset, first timestamp) -> last offset."""

    rows: list[ResultRow] = field(default_factory=list)
    since: float = 0.0
    leftovers: dict[tuple[int, int], int] | None = None


def _stamp(row: ResultRow) -> int:
    # 0 when the broker kept no timestamp: lives are then told apart by the file's content alone.
    return max(row.timestamp_ms or 0, 0)


def result_file(chunk: Sequence[ResultRow]) -> str:
    first, last = chunk[0], chunk[-1]
    return f"{first.topic}-{first.partition}-{first.offset:020d}-{last.offset:020d}-{_stamp(first)}.parquet"


def _parquet(rows: Sequence[ResultRow]) -> bytes:
    columns: dict[str, list[Any]] = {name: [] for name in RESULTS_SCHEMA.names}
    for row in rows:
        values = row.columns()
        values["time"] = datetime.fromisoformat(row.time) if row.time else None
        values["outputs"] = None if row.outputs is None else json.dumps(row.outputs)
        for name in RESULTS_SCHEMA.names:
            columns[name].append(values[name])
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=RESULTS_SCHEMA), buffer)
    return buffer.getvalue()


class FileSink(FileStore, Sink):
    """Results as Parquet files, one partition's offset range each, rolled by rows or age."""

    type: ClassVar[str]

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._where = self.location(details)
        self._roll_rows = int(details.get("roll_rows") or ROLL_ROWS)
        self._roll_s = float(details.get("roll_seconds") or ROLL_SECONDS)
        self._held: dict[Partition, _Held] = {}
        self._taken: dict[Partition, int] = {}
        """Per partition, the last offset taken (held or written): a batch written again after an
        Unavailable adds none of its rows twice."""

    def write(self, rows: Sequence[ResultRow]) -> None:
        taken = dict(self._taken)
        for row in rows:
            where = (row.topic, row.partition)
            if row.offset <= taken.get(where, -1):
                continue
            held = self._held.setdefault(where, _Held())
            if not held.rows:
                held.since = time.monotonic()
            held.rows.append(row)
            self._taken[where] = row.offset
        self._roll(by_age=False)

    def tick(self) -> None:
        self._roll(by_age=True)

    def held(self) -> dict[Partition, int]:
        return {where: h.rows[0].offset for where, h in self._held.items() if h.rows}

    def revoked(self, partitions: Sequence[Partition]) -> None:
        for where in partitions:
            self._held.pop(where, None)
            self._taken.pop(where, None)

    def _roll(self, by_age: bool) -> None:
        now = time.monotonic()
        for where, held in self._held.items():
            while held.rows:
                end = self._end(where, held, aged=by_age and now - held.since >= self._roll_s)
                if end == 0:
                    break
                chunk = held.rows[:end]
                name = result_file(chunk)
                if not self._where.put(name, _parquet(chunk)):
                    self._check_leftover(name, chunk)
                del held.rows[:end]
                held.since = now

    def _end(self, where: Partition, held: _Held, aged: bool) -> int:
        """How many of the held rows the next file takes (0: none yet). It ends where a leftover
        starting at the same offset ends; else after ``roll_rows`` rows, or all rows once aged, never
        between two rows of one offset (the rows of one log record)."""
        rows = held.rows
        if held.leftovers is None:
            held.leftovers = self._leftovers(where, rows[0].offset)
        last = held.leftovers.get((rows[0].offset, _stamp(rows[0])))
        if last is not None:
            if rows[-1].offset < last:
                return 0  # the replay has not reached the leftover's end yet
            return sum(1 for r in rows if r.offset <= last)
        if len(rows) < self._roll_rows and not aged:
            return 0
        end = min(len(rows), self._roll_rows)
        while end < len(rows) and rows[end].offset == rows[end - 1].offset:
            end += 1
        return end

    def _leftovers(self, where: Partition, start: int) -> dict[tuple[int, int], int]:
        """The partition's files from offset ``start`` on, (first offset, first timestamp) -> last
        offset: written by a process that died before it committed them, or in an earlier life of the
        topic (whose timestamps the replay's rows do not have)."""
        found: dict[tuple[int, int], int] = {}
        for entry in self._where.list():
            parsed = _RESULT_FILE.match(entry.name)
            if (
                parsed
                and (parsed["topic"], int(parsed["partition"])) == where
                and int(parsed["first"]) >= start
            ):
                found[(int(parsed["first"]), int(parsed["stamp"]))] = int(parsed["last"])
        if found:
            log.info(
                "bridge sink: %d files of %s[%d] from offset %d may be leftovers", len(found), *where, start
            )
        return found

    def _check_leftover(self, name: str, chunk: Sequence[ResultRow]) -> None:
        """Returns when the file already named ``name`` holds ``chunk``'s rows (a predecessor wrote it
        and died before committing); else Unavailable, since it holds results this sink must not
        overwrite."""
        try:
            there = pq.read_table(pa.BufferReader(self._where.read(name)), columns=["request_id"])
        except (ValueError, pa.ArrowException) as exc:
            raise Unavailable(
                f"{name} is there already and unreadable, not overwritten: {first_line(exc)}"
            ) from None
        ids = there.column("request_id")
        if there.num_rows != len(chunk) or ids[0].as_py() != chunk[0].request_id:
            raise Unavailable(
                f"{name} is there already with other results ({there.num_rows} rows from request "
                f"{ids[0].as_py() if there.num_rows else None!r}), not overwritten: move it away"
            )
