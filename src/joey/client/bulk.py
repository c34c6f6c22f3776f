"""Bulk inference, Wallaroo's verbs: records from a file, in chunks (``infer_from_file``); batches in
parallel with retries of the rows known never to have reached the pipeline (``parallel_infer``); and
``infer`` as an asyncio coroutine (``async_infer``). Each goes through ``Pipeline.infer`` and returns its
result columns, one row per input record, in input order, with per-row errors.

Nothing is sent unless all of the data is fit to send: a file is read through once first (in chunks, so
memory holds one chunk) to check that it parses and that its records fit the pipeline's inputs, then read
again to send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeAlias, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from joey.client.inputs import InputError, RecordInput, to_records
from joey.client.streaming import InferenceTimeout, Progress
from joey_core.lazy import LazyModule
from joey_core.replies import Reply, failed_reply
from joey_core.results import replies_to_frame

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

# Strings: evaluating the aliases would import pandas.
Data: TypeAlias = "pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any]"
Chunk: TypeAlias = "pa.Table | pd.DataFrame | list[dict[str, Any]]"

FORMATS = ("json", "arrow", "parquet")
"""``json``: a JSON array of records (pandas' ``orient="records"``) or JSON lines, one record per line;
``arrow``: Apache Arrow IPC, file or stream format (Feather v2 is the file format); ``parquet``."""
_SUFFIXES = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".arrow": "arrow",
    ".arrows": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_ARROW_FILE_MAGIC = b"ARROW1"
_FEATHER_V1_MAGIC = b"FEA1"
_VERSION = "metadata.pipeline_version"
"""The result column of the pipeline version that answered a row: empty for a row the pipeline never saw."""


class _Deployment(Protocol):
    """What the bulk verbs read of a :class:`joey.client.pipelines.DeploymentStatus`."""

    @property
    def deployment_id(self) -> str: ...
    @property
    def pipeline_version(self) -> int: ...


class BulkPipeline(Protocol):
    """What the bulk verbs need of a :class:`joey.client.pipelines.Pipeline`: its own ``infer`` and the
    helpers ``infer`` uses (the module sits below ``pipelines`` and is part of it)."""

    name: str

    def infer(
        self, data: Any, timeout: float = ..., progress: Progress | None = ...
    ) -> pd.DataFrame | pa.Table: ...

    def _deployed_status(self) -> _Deployment: ...

    def _record_inputs(self, deployed: tuple[str, int]) -> Sequence[RecordInput]: ...

    def _record_chunks(self, data: Any, deployed: tuple[str, int]) -> tuple[int, Iterable[Sequence[Any]]]: ...


class InputFileError(InputError):
    """A file ``infer_from_file`` refuses, having sent nothing: the message names the file and the problem."""


class _Shaper:
    """The deployed pipeline's inputs, as ``infer`` has them (its cached status and inputs), and the check
    that data fits them."""

    def __init__(self, pipeline: BulkPipeline) -> None:
        self.pipeline = pipeline
        status = pipeline._deployed_status()  # noqa: SLF001 (Pipeline's own helpers: see BulkPipeline)
        self.deployed = (status.deployment_id, status.pipeline_version)

    def inputs(self) -> Sequence[RecordInput]:
        return self.pipeline._record_inputs(self.deployed)  # noqa: SLF001

    def records(self, data: Data | Chunk) -> list[Any]:
        """The input records of ``data``, as ``infer`` sends them; InputError when they do not fit."""
        return to_records(data, self.inputs, self.pipeline.name)

    def check(self, chunk: Chunk, first_row: int) -> None:
        """Raise InputError when a chunk of a file, its first row numbered ``first_row``, does not fit."""
        data = self.shaped(chunk, first_row)
        fields = {i.field for i in self.inputs()}
        if isinstance(data, pa.Table) and fields and not fields.intersection(data.column_names):
            # Packed as a frame numbered like the file, so that an error names the row of the file.
            data = data.to_pandas().set_axis(pd.RangeIndex(first_row, first_row + data.num_rows))
        self.records(data)

    def shaped(self, chunk: Chunk, first_row: int) -> Chunk:
        """A chunk of a file as ``infer`` takes it. Records naming no input field become a frame with a column
        per key (``first_row`` numbering its rows), which ``infer`` packs as it packs a DataFrame: pandas'
        records JSON of a frame of feature columns; other records are sent as they are."""
        if not isinstance(chunk, list):
            return chunk
        fields = {i.field for i in self.inputs()}
        if not fields or any(fields.intersection(record) for record in chunk):
            return chunk
        return pd.DataFrame(chunk, index=pd.RangeIndex(first_row, first_row + len(chunk)))


# --- infer_from_file ---------------------------------------------------------------------------------------


def infer_from_file(
    pipeline: BulkPipeline,
    path: str | Path,
    data_format: str | None = None,
    timeout: float = 60.0,
    progress: Progress | None = None,
    chunk_rows: int = 10_000,
) -> pd.DataFrame | pa.Table:
    """See :meth:`joey.client.pipelines.Pipeline.infer_from_file`."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    path = Path(path)
    fmt = file_format(path, data_format)
    # Made once the first chunk is read: a file that does not parse is refused without asking the registry.
    shaper: _Shaper | None = None
    total = 0
    for chunk in _chunks(path, fmt, chunk_rows):  # the check pass: nothing is sent
        shaper = shaper or _Shaper(pipeline)
        try:
            shaper.check(chunk, total)
        except InputError as exc:
            raise InputFileError(f"{path}: {exc.message}") from None
        total += len(chunk)
    results: list[Any] = []
    done = 0
    for chunk in _chunks(path, fmt, chunk_rows):
        # Rows past the checked ones were never checked: refused before they are sent.
        if shaper is None or done + len(chunk) > total:
            raise _changed(path, total)

        def chunk_progress(answered: int, _: int, before: int = done) -> None:
            if progress:
                progress(before + answered, total)

        data = shaper.shaped(chunk, done)
        results.append(_attempt(pipeline, data, timeout, chunk_progress).result)
        done += len(chunk)
    if done != total:
        raise _changed(path, total)
    if fmt == "json":
        return _concat_frames(results)
    return _concat_tables(results)


def _changed(path: Path, checked: int) -> InputFileError:
    return InputFileError(
        f"{path} changed while it was being read: {checked} records were checked, and the file read again to "
        "send them has a different number (the records sent so far are not returned)"
    )


def file_format(path: Path, data_format: str | None) -> str:
    """``data_format``, else the format the suffix of ``path`` names; InputFileError for neither."""
    if data_format is not None:
        if data_format not in FORMATS:
            raise InputFileError(
                f"unknown data_format {data_format!r} for {path}: use one of {', '.join(FORMATS)}"
            )
        return data_format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputFileError(
            f"cannot tell the format of {path} from its suffix {path.suffix!r}: name it "
            f"{', '.join(_SUFFIXES)}, or pass data_format ({', '.join(FORMATS)})"
        )
    return fmt


def _chunks(path: Path, fmt: str, rows: int) -> Iterator[Chunk]:
    """The file's records, ``rows`` at a time: lists of records for JSON, tables otherwise."""
    try:
        if fmt == "json":
            yield from _json_chunks(path, rows)
        else:
            batches = _parquet_batches(path, rows) if fmt == "parquet" else _arrow_batches(path)
            yield from _rechunked(batches, rows)
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (pa.ArrowException, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        what = {"parquet": "a Parquet file", "arrow": "an Arrow IPC file or stream"}.get(fmt, "JSON")
        raise InputFileError(f"{path} is not {what} that can be read: {exc}") from None


def _json_chunks(path: Path, rows: int) -> Iterator[list[dict[str, Any]]]:
    """Records of a JSON array (read whole: it is one JSON value), of a JSON object (one record, maybe over
    several lines), or of JSON lines, ``rows`` at a time."""
    with path.open("rb") as file:
        if file.read(64).lstrip().startswith(b"["):
            file.seek(0)
            records = _json_array(path, file.read())
            for at in range(0, len(records), rows):
                yield records[at : at + rows]
            return
        file.seek(0)
        record = _json_object(file.readline(), file)
        if record is not None:
            yield [record]
            return
        file.seek(0)
        chunk: list[dict[str, Any]] = []
        for number, line in enumerate(file, 1):
            if line.strip():
                chunk.append(_json_line(path, number, line))
            if len(chunk) == rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _json_object(first_line: bytes, rest: BinaryIO) -> dict[str, Any] | None:
    """The record of a file holding one JSON object over several lines (pretty-printed), which is one
    record; None for JSON lines (the first line is a JSON value of its own) or for what is no JSON object
    (then refused line by line, naming the line)."""
    if not first_line.lstrip().startswith(b"{"):
        return None
    try:
        json.loads(first_line)
    except ValueError:
        pass
    else:
        return None
    try:
        record = json.loads(first_line + rest.read())
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _json_array(path: Path, text: bytes) -> list[dict[str, Any]]:
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise InputFileError(f"{path} is neither JSON nor JSON lines: {exc}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputFileError(
                f"{path}: item {index} of the array is a {type(record).__name__}, not a JSON object (a "
                'record mapping field names to values, e.g. {"features": [5.1, 3.5, 1.4, 0.2]})'
            )
    return list(records)


def _json_line(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        raise InputFileError(f"{path} is neither JSON nor JSON lines: line {number}: {msg}") from None
    if not isinstance(record, dict):
        raise InputFileError(
            f"{path}: line {number} is a {type(record).__name__}, not a JSON object (one record per line, "
            'e.g. {"features": [5.1, 3.5, 1.4, 0.2]})'
        )
    return record


def _parquet_batches(path: Path, rows: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(batch_size=rows)


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    # Memory-mapped: a batch's pages are read when the batch is used, not the file at once.
    with pa.memory_map(str(path)) as source:
        magic = source.read(len(_ARROW_FILE_MAGIC))
        source.seek(0)
        if magic.startswith(_FEATHER_V1_MAGIC):
            raise InputFileError(
                f"{path} is a Feather version 1 file, which has no record batches: write it again as Arrow "
                "IPC (pyarrow.feather.write_feather(table, path) writes version 2)"
            )
        if magic == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)
        else:
            yield from pa.ipc.open_stream(source)


def _rechunked(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of ``rows`` rows (the last one fewer) from batches of any size: small batches are joined so
    that each ``infer`` call carries a useful amount."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


# --- parallel_infer ----------------------------------------------------------------------------------------


_Batch: TypeAlias = list[tuple[int, Any]]
"""Records of a batch, each with its position in the data."""


def parallel_infer(
    pipeline: BulkPipeline,
    data: Data,
    batch_size: int = 1000,
    num_parallel: int = 4,
    retries: int = 1,
    timeout: float = 60.0,
    progress: Progress | None = None,
    retry_timed_out: bool = False,
) -> pd.DataFrame | pa.Table:
    """See :meth:`joey.client.pipelines.Pipeline.parallel_infer`."""
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("num_parallel", num_parallel, 1),
        ("retries", retries, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    # Checks all of the data (nothing is sent yet); its records are then made a chunk at a time.
    total, chunks = pipeline._record_chunks(data, _Shaper(pipeline).deployed)  # noqa: SLF001
    todo: Iterator[tuple[int, Any]] = enumerate(itertools.chain.from_iterable(chunks))
    pieces: list[pd.DataFrame] = []
    done = 0
    for attempt in range(retries + 1):
        last = attempt == retries
        again: _Batch = []
        with contextlib.closing(_run(pipeline, _batches(todo, batch_size), num_parallel, timeout)) as run:
            for batch, outcome in run:
                retry = [
                    not last and (unsent or (retry_timed_out and timed_out))
                    for unsent, timed_out in zip(outcome.not_sent, outcome.timed_out, strict=True)
                ]
                again += [item for item, r in zip(batch, retry, strict=True) if r]
                keep = [not r for r in retry]
                # Records give a frame (only an Arrow table gives a table).
                kept = cast(pd.DataFrame, outcome.result)[keep].copy()
                kept.insert(0, "_position", [p for (p, _), k in zip(batch, keep, strict=True) if k])
                pieces.append(kept)
                done += sum(keep)
                if progress:
                    progress(done, total)
        if not again:
            break
        todo = iter(again)
    result = _concat_frames(pieces, by="_position")
    return pa.Table.from_pandas(result, preserve_index=False) if isinstance(data, pa.Table) else result


def _batches(records: Iterator[tuple[int, Any]], size: int) -> Iterator[_Batch]:
    while batch := list(itertools.islice(records, size)):
        yield batch


def _run(
    pipeline: BulkPipeline,
    batches: Iterator[_Batch],
    num_parallel: int,
    timeout: float,
) -> Generator[tuple[_Batch, _Outcome], None, None]:
    """Each batch with its outcome, as batches complete: ``num_parallel`` run at once, and as many are made
    ahead, so memory holds about twice that many. An error other than a timeout (the pipeline undeployed,
    the broker unreachable), an interrupt, or the caller stopping cancels the batches not started yet (those
    running end their call in their thread) and is raised."""
    pool = ThreadPoolExecutor(max_workers=num_parallel, thread_name_prefix="joey-parallel-infer")
    running: dict[Future[_Outcome], _Batch] = {}

    def submit() -> None:
        batch = next(batches, None)
        if batch is not None:
            running[pool.submit(_attempt, pipeline, [row for _, row in batch], timeout)] = batch

    try:
        for _ in range(2 * num_parallel):
            submit()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                batch = running.pop(future)
                outcome = future.result()
                submit()
                yield batch, outcome
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


@dataclass
class _Outcome:
    """What one ``infer`` call of a batch or chunk gave: its result rows, and per row whether it went
    unanswered because it was not sent, or because no reply came in time."""

    result: pd.DataFrame | pa.Table
    not_sent: list[bool]
    timed_out: list[bool]


def _attempt(
    pipeline: BulkPipeline,
    data: Any,
    timeout: float,
    progress: Progress | None = None,
) -> _Outcome:
    """``infer`` of ``data``; rows with no reply in time are error rows of their own instead of a timeout."""
    try:
        result = pipeline.infer(data, timeout, progress)
    except InferenceTimeout as exc:
        now = datetime.now(UTC).isoformat()
        replies: list[Reply] = [
            reply or failed_reply(request_id, f"no reply from the pipeline within {timeout:g}s", now)
            for reply, request_id in zip(exc.replies, exc.request_ids, strict=True)
        ]
        frame = replies_to_frame(replies)
        return _Outcome(
            pa.Table.from_pandas(frame, preserve_index=False) if isinstance(data, pa.Table) else frame,
            [reply is not None and "metadata" not in reply.body for reply in exc.replies],
            [reply is None for reply in exc.replies],
        )
    # The engine sets metadata on every record it writes, its error records too: a row without any failed
    # on the caller's side, before it reached the pipeline (joey.client.streaming.not_sent).
    versions = _column(result, _VERSION)
    return _Outcome(result, [v is None or v is pd.NA for v in versions], [False] * len(versions))


def _column(result: pd.DataFrame | pa.Table, name: str) -> list[Any]:
    """A column of a result as a list, all None when the result has none."""
    if name not in result.columns if isinstance(result, pd.DataFrame) else name not in result.column_names:
        return [None] * len(result)
    return result[name].tolist() if isinstance(result, pd.DataFrame) else result.column(name).to_pylist()


# --- async_infer -------------------------------------------------------------------------------------------


async def async_infer(
    pipeline: BulkPipeline, data: Data, timeout: float = 60.0, progress: Progress | None = None
) -> pd.DataFrame | pa.Table:
    """See :meth:`joey.client.pipelines.Pipeline.async_infer`."""
    return await asyncio.to_thread(pipeline.infer, data, timeout, progress)


# --- results -----------------------------------------------------------------------------------------------


def _columns(pieces: Sequence[Sequence[str]]) -> list[str]:
    """Every column of the pieces, in the order of the piece with the most (a piece of failed rows lacks the
    ``out.*`` columns), then the others."""
    widest = max(pieces, key=len, default=[])
    return list(dict.fromkeys([*widest, *(c for piece in pieces for c in piece)]))


def _concat_frames(frames: Sequence[pd.DataFrame], by: str | None = None) -> pd.DataFrame:
    """The frames as one, sorted by column ``by`` (then dropped) if given, typed as ``infer`` types them."""
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    if by is not None:
        frame = frame.sort_values(by, kind="stable").drop(columns=by)
    order = _columns([[c for c in f.columns if c != by] for f in frames])
    return frame[order].reset_index(drop=True).convert_dtypes()


def _concat_tables(tables: Sequence[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.select(_columns([t.column_names for t in tables]))
