"""Inference logs written to files a page at a time, so memory holds one page and one open file.

Files are ``<prefix>-00001.<ext>``, ``<prefix>-00002.<ext>``... of at most ``rows_per_file`` rows
each, in the order the pages arrive. A file is written under a ``.partial`` name and renamed when
complete, so a file with the final name is always whole.

Parquet files need one schema per file. Fixed columns have fixed types; the ``in.*``/``out.*``
columns take the types of the first rows written to the file (a column whose values disagree in
type within those rows, such as a list next to a string, is stored as JSON text and marked with
the field metadata ``joey.encoding: json``). Rows that do not fit the file's schema (a new
column, or a value of another type) start a new file, so a file may end before
``rows_per_file`` rows.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from pathlib import Path
from typing import IO, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from joey_core.results import flatten, flatten_shadow
from joey_core.v1 import registry_pb2 as pb

Row = dict[str, Any]
Progress = Callable[[int, int], None]

JSON_ENCODING = {b"joey.encoding": b"json"}

_LEADING = ("time", "request_id", "pipeline_version", "ok", "error")

_FIXED_TYPES = {
    "time": pa.timestamp("us", tz="UTC"),
    "request_id": pa.string(),
    "pipeline_version": pa.int64(),
    "ok": pa.bool_(),
    "error": pa.string(),
    "check_failures": pa.list_(pa.string()),
    "models": pa.list_(pa.string()),
    "elapsed_ns": pa.list_(pa.int64()),
    "partition": pa.int32(),
    "offset": pa.int64(),
}


def log_entry_row(e: pb.LogEntry) -> Row:
    """One logged inference as a flat row: the columns of ``joey.client.client.log_entries_to_frame``."""
    row: Row = {
        "time": e.time.ToDatetime(tzinfo=UTC),
        "request_id": e.request_id,
        "pipeline_version": e.pipeline_version,
        "ok": e.ok,
        "error": e.error or None,
    }
    row |= flatten("in", json.loads(e.inputs_json) if e.inputs_json else None)
    row |= flatten("out", json.loads(e.outputs_json) if e.outputs_json else None)
    row |= flatten_shadow(json.loads(e.shadow_json) if e.shadow_json else None)
    row["check_failures"] = list(e.check_failures)
    row["models"] = [f"{m.name}:{m.version}" for m in e.models]
    row["elapsed_ns"] = list(e.elapsed_ns)
    row["partition"] = e.input_partition
    row["offset"] = e.input_offset
    return row


class LogFile(ABC):
    """One output file; rows are appended a chunk at a time."""

    extension: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._partial = path.with_name(path.name + ".partial")

    def append(self, rows: Sequence[Row]) -> bool:
        """Write ``rows``, or return False having written nothing if they do not fit this file."""
        if not self._write(rows):
            return False
        self.rows += len(rows)
        return True

    def finish(self) -> None:
        self._close()
        self._partial.replace(self.path)

    def discard(self) -> None:
        self._close()
        self._partial.unlink(missing_ok=True)

    @abstractmethod
    def _write(self, rows: Sequence[Row]) -> bool: ...

    @abstractmethod
    def _close(self) -> None: ...


class JsonlFile(LogFile):
    """One JSON object per line, time as ISO-8601."""

    extension = "jsonl"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._out: IO[str] = self._partial.open("w", encoding="utf-8")

    def _write(self, rows: Sequence[Row]) -> bool:
        for row in rows:
            self._out.write(json.dumps(row | {"time": row["time"].isoformat()}) + "\n")
        return True

    def _close(self) -> None:
        self._out.close()


class ParquetFile(LogFile):
    extension = "parquet"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._writer: pq.ParquetWriter | None = None

    def _write(self, rows: Sequence[Row]) -> bool:
        # Inputs before outputs whichever kind of row comes first, so files agree on column order.
        names = sorted(dict.fromkeys(name for row in rows for name in row), key=_column_group)
        if self._writer is None:
            schema = pa.schema([_field(name, [row.get(name) for row in rows]) for name in names])
            self._writer = pq.ParquetWriter(self._partial, schema)
        schema = self._writer.schema
        if not set(names) <= set(schema.names):
            return False
        columns = [_column(f, [row.get(f.name) for row in rows]) for f in schema]
        if any(c is None for c in columns):
            return False
        self._writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        return True

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()


WRITERS: dict[str, type[LogFile]] = {"parquet": ParquetFile, "jsonl": JsonlFile}
FORMATS = tuple(WRITERS)


def _column_group(name: str) -> int:
    if name.startswith("in."):
        return 1
    if name.startswith("out."):
        return 2
    return 0 if name in _LEADING else 3


def _field(name: str, values: list[Any]) -> pa.Field:
    if name in _FIXED_TYPES:
        return pa.field(name, _FIXED_TYPES[name])
    try:
        return pa.field(name, pa.array(values).type)
    except (pa.ArrowException, OverflowError):
        return pa.field(name, pa.string(), metadata=JSON_ENCODING)


def _column(field: pa.Field, values: list[Any]) -> pa.Array | None:
    """The values as an array of the field's type; None if they cannot be stored losslessly."""
    if field.name in _FIXED_TYPES:
        return pa.array(values, type=field.type)
    if field.metadata == JSON_ENCODING:
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    try:
        # Inferred first, then cast safely: pa.array(..., type=int64) would truncate 1.5 to 1.
        return pa.array(values).cast(field.type, safe=True)
    except (pa.ArrowException, OverflowError):
        return None


class LogExport:
    """Validates the target up front, then writes pages of log entries into numbered files."""

    def __init__(
        self, directory: str | Path, format: str, prefix: str, rows_per_file: int, overwrite: bool
    ) -> None:
        if format not in WRITERS:
            raise ValueError(f"unknown export format {format!r}; use one of: {', '.join(FORMATS)}")
        if not prefix or Path(prefix).name != prefix or prefix in (".", ".."):
            raise ValueError(f"file prefix {prefix!r} must be a plain file name, without a directory")
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = WRITERS[format]
        self._prefix = prefix
        self._rows_per_file = rows_per_file
        self._previous = self._existing()
        if self._previous and not overwrite:
            raise FileExistsError(
                f"{len(self._previous)} {format} file(s) named {prefix}-NNNNN.{self._writer.extension} "
                f"already exist in {self.directory} (first: {self._previous[0].name}); "
                "pass overwrite=True to replace them"
            )

    def _existing(self) -> list[Path]:
        pattern = re.compile(rf"{re.escape(self._prefix)}-\d{{5,}}\.{self._writer.extension}(\.partial)?")
        return sorted(p for p in self.directory.iterdir() if pattern.fullmatch(p.name))

    def write(
        self, pages: Iterable[tuple[Sequence[pb.LogEntry], int]], progress: Progress | None
    ) -> list[Path]:
        """Write every page; ``pages`` yields (entries, total matching rows). Files of an earlier
        export with the same prefix are removed only once this one is complete."""
        files: list[LogFile] = []
        written = 0
        try:
            for entries, total in pages:
                rows = [log_entry_row(e) for e in entries]
                while rows:
                    if not files or files[-1].rows >= self._rows_per_file:
                        self._start_file(files)
                    chunk = rows[: self._rows_per_file - files[-1].rows]
                    if not files[-1].append(chunk):
                        if files[-1].rows == 0:
                            raise RuntimeError(f"log rows could not be written to {files[-1].path}")
                        self._start_file(files)
                        continue
                    rows = rows[len(chunk) :]
                    written += len(chunk)
                if progress:
                    progress(written, total)
            if files:
                files[-1].finish()
        except BaseException:
            if files:
                files[-1].discard()
            raise
        paths = [f.path for f in files]
        for stale in set(self._previous) - set(paths):
            stale.unlink(missing_ok=True)
        return paths

    def _start_file(self, files: list[LogFile]) -> None:
        if files:
            files[-1].finish()
        name = f"{self._prefix}-{len(files) + 1:05d}.{self._writer.extension}"
        files.append(self._writer(self.directory / name))
