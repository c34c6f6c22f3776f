"""Wire formats of the records Joey moves over Kafka.

* Input record: a JSON object mapping input names to values (one row); a key that appears twice
  in one object makes the record invalid (parsers disagree on which one wins). The record key and
  the ``request-id`` header travel through to outputs, errors and logs (a request id is at most
  :data:`REQUEST_ID_MAX_BYTES` of UTF-8; see :func:`parse_request_id`). An optional
  ``deadline-ms`` header (epoch milliseconds) marks when the caller stops waiting: a replica
  reaching the record later does not run it and reports it as an error instead.
* Output record: JSON with ``time``, ``in``, ``out``, ``check_failures`` and ``metadata``.
* Error record: JSON with ``time``, ``request_id``, ``error``, ``input`` (or ``raw_input``)
  and ``metadata``.
* Log record: Avro, schemaless body with a ``content-type`` header naming the schema: one
  ``joey.v1.InferenceLogBatch`` (``schemas/inference_log_batch.avsc``) holding the logs of one
  micro-batch, or, as engines before the batched format wrote and readers still accept, one
  ``joey.v1.InferenceLog`` (``schemas/inference_log.avsc``; also when the header is missing).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import fastavro
import numpy as np
import orjson

REQUEST_ID_HEADER = "request-id"
DEADLINE_HEADER = "deadline-ms"
DEADLINE_EXCEEDED = "deadline exceeded"
"""How the reason of a record dropped past its deadline starts; synchronous callers match on it."""
REQUEST_ID_MAX_BYTES = 1024
"""Longest request id that travels as it was sent; a longer one fails its record (see parse_request_id)."""
CONTENT_TYPE_HEADER = "content-type"
LOG_CONTENT_TYPE = "application/avro; schema=joey.v1.InferenceLog"
LOG_BATCH_CONTENT_TYPE = "application/avro; schema=joey.v1.InferenceLogBatch"


class RecordError(ValueError):
    """A record that cannot be processed; the message is the reason shown to the user."""


def header_value(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            return value.decode("utf-8", errors="replace")
    return None


def decode_input(value: bytes | None) -> dict[str, Any]:
    """Parse one input record; raise RecordError naming what is wrong, and nothing else."""
    if value is None:
        raise RecordError("empty record: expected a JSON object mapping input names to values")
    try:
        row = _loads(value)
        if not _surely_unique(value, row):
            row = json.loads(value, object_pairs_hook=_unique_keys)
    except RecordError:
        raise
    except RecursionError:
        raise RecordError("record is not valid JSON: nested too deeply") from None
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is an integer of more digits
    # than Python converts (sys.get_int_max_str_digits): whatever json raises is the record's fault.
    except ValueError as exc:
        raise RecordError(f"record is not valid JSON: {bounded_text(str(exc), 200)}") from None
    if not isinstance(row, dict):
        raise RecordError(
            f"record must be a JSON object mapping input names to values, got {type(row).__name__}"
        )
    return row


_WIDE_NUMBER = re.compile(rb"[0-9]{19}")
"""A run of digits that may be an integer beyond 64 bits, which orjson turns into a float (json does not)."""


_DEEP_BRACKETS = 500
"""Below the depth json refuses in any caller's stack, so orjson decides only what json would accept."""


def _loads(value: bytes) -> Any:
    """``json.loads(value)``, decided by orjson (ten times faster) where both decide alike.

    orjson refuses what json accepts (NaN and Infinity, numbers that overflow a double, lone surrogate
    escapes, UTF-16/32 and a byte order mark, nesting deeper than 1024): those go to json, which keeps
    its decision and its reasons. It reads an integer beyond 64 bits as a float, where json keeps the
    integer (refused later as out of range): text with 19 digits in a row goes to json too. Duplicate
    keys: both keep the last (checked after, for both). json's depth limit is the interpreter's recursion
    limit less the stack in use (about 1000 at most), lower than orjson's: text with as many brackets as
    :data:`_DEEP_BRACKETS` (a cheap bound on its depth) goes to json, which then decides alone."""
    if value.count(b"[") + value.count(b"{") < _DEEP_BRACKETS and _WIDE_NUMBER.search(value) is None:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    return json.loads(value)


def _surely_unique(value: bytes, row: Any) -> bool:
    """True when ``row`` (parsed from ``value``) cannot have lost a duplicate key: a flat object with as
    many keys as the text has colons (every key is followed by one, colons in strings only add to the
    count). Anything else is parsed again with the checking hook, which is three times slower."""
    return isinstance(row, dict) and value.count(b"{") == 1 and len(row) == value.count(b":")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys, other readers of the same bytes (the outputs' "in", jsonb)
    # may keep another: refusing them leaves one meaning for every record.
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RecordError(
                    f"record has the key {bounded_text(key, 100)!r} more than once in one object"
                )
            seen.add(key)
    return row


def bounded_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_request_id(raw: bytes) -> tuple[str, str | None]:
    """The request id a record's ``request-id`` header carries into outputs, errors and logs, and why the
    header cannot be used as sent (None when it can).

    A UTF-8 id of at most :data:`REQUEST_ID_MAX_BYTES` travels as sent. Any other (longer, or not UTF-8)
    is cut and ends in a digest of its raw bytes, so it stays bounded (its UTF-8 form too: replacing bad
    bytes by U+FFFD would triple them), deterministic and distinct (two ids that differ only in their
    bad bytes do not collapse into one).
    """
    if len(raw) > REQUEST_ID_MAX_BYTES:
        problem = f"request-id header is {len(raw)} bytes, over the {REQUEST_ID_MAX_BYTES} allowed"
    else:
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            problem = f"request-id header is not UTF-8 (byte {exc.start})"
    digest = hashlib.sha256(raw).hexdigest()[:32]
    return f"{raw[:256].decode('utf-8', errors='replace')}...sha256:{digest}", problem


def to_jsonable(value: Any) -> Any:
    """Convert numpy values to JSON; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps_text(value: Any) -> str:
    """Strict JSON text. Plain Python values (the common case) skip the conversion walk."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError):
        return _ENCODER.encode(to_jsonable(value))


def dumps(value: Any) -> bytes:
    return dumps_text(value).encode()


_NON_STRICT_TOKENS = (b"NaN", b"Infinity")


def strict_json_text(raw: bytes | None, parse: Callable[[], Any]) -> str:
    """Strict JSON text of a record that parses as JSON: ``raw`` itself when it is strict already.

    Python's parser accepts NaN and Infinity, which JSON (and Postgres jsonb) do not; only then
    is the value parsed (``parse()``) and encoded again, with those values as null.
    """
    if raw is not None and not any(token in raw for token in _NON_STRICT_TOKENS):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return dumps_text(parse())


@cache
def log_schema() -> Any:
    return fastavro.parse_schema(_schema_json("inference_log.avsc"), named_schemas=_named_schemas())


@cache
def log_batch_schema() -> Any:
    log_schema()  # its entries' type, which it refers to by name
    return fastavro.parse_schema(_schema_json("inference_log_batch.avsc"), named_schemas=_named_schemas())


@cache
def _named_schemas() -> dict[str, Any]:
    # The batch's entries refer to joey.v1.InferenceLog by name: both schemas are parsed into one namespace.
    return {}


def _schema_json(name: str) -> Any:
    return json.loads(resources.files("joey_core.schemas").joinpath(name).read_text())


def encode_log(record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, log_schema(), record)
    return buffer.getvalue()


def encode_log_batch(entries: Sequence[dict[str, Any]]) -> bytes:
    """One ``joey.v1.InferenceLogBatch`` of ``entries`` (the dicts :func:`encode_log` takes), all of one
    workspace and pipeline. One call for the whole batch is what makes logging cheap per inference.

    Raises ValueError for no entries or mixed pipelines; an entry fastavro cannot encode raises whatever
    fastavro raises (the caller finds it by splitting the batch)."""
    if not entries:
        raise ValueError("a log batch needs at least one entry")
    workspace, pipeline = entries[0]["workspace"], entries[0]["pipeline"]
    if any(e["workspace"] != workspace or e["pipeline"] != pipeline for e in entries):
        raise ValueError("the entries of a log batch must all be of one workspace and pipeline")
    batch = {
        "workspace": workspace,
        "pipeline": pipeline,
        "latest": max(e["time"] for e in entries),
        "entries": entries,
    }
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, log_batch_schema(), batch)
    return buffer.getvalue()


def decode_log(data: bytes) -> dict[str, Any]:
    return fastavro.schemaless_reader(io.BytesIO(data), log_schema(), log_schema())  # type: ignore[return-value]


def is_log_record(headers: list[tuple[str, bytes | None]] | None) -> bool:
    """Whether a record's headers allow it to be a log record (one without a content type may be)."""
    return header_value(headers, CONTENT_TYPE_HEADER) in (None, LOG_CONTENT_TYPE, LOG_BATCH_CONTENT_TYPE)


def _decode_single(value: bytes | None) -> dict[str, Any]:
    """The InferenceLog of an old-format (one log per record) ``joey.logs`` record."""
    if not value:
        raise RecordError("empty record: expected an Avro joey.v1.InferenceLog")
    try:
        return decode_log(value)
    # fastavro reports corrupt input with whatever the bytes happen to trip over (EOFError,
    # IndexError, UnicodeDecodeError, ...), so every failure is a reason to dead-letter.
    except Exception as exc:
        raise RecordError(f"not an Avro joey.v1.InferenceLog ({type(exc).__name__}: {exc})") from None


def decode_log_entries(
    headers: list[tuple[str, bytes | None]] | None, value: bytes | None
) -> list[dict[str, Any]]:
    """The InferenceLog entries a ``joey.logs`` record carries, in either format; raise RecordError
    naming what is wrong (and nothing else, whatever the bytes)."""
    content_type = header_value(headers, CONTENT_TYPE_HEADER)
    if content_type != LOG_BATCH_CONTENT_TYPE:
        if content_type not in (None, LOG_CONTENT_TYPE):
            raise RecordError(
                f"unexpected content-type {content_type!r}, expected {LOG_BATCH_CONTENT_TYPE!r} "
                f"or {LOG_CONTENT_TYPE!r}"
            )
        return [_decode_single(value)]
    if not value:
        raise RecordError("empty record: expected an Avro joey.v1.InferenceLogBatch")
    try:
        batch: dict[str, Any] = fastavro.schemaless_reader(  # type: ignore[assignment]
            io.BytesIO(value), log_batch_schema(), log_batch_schema()
        )
    # As for one record: corrupt bytes raise whatever they trip over.
    except Exception as exc:
        raise RecordError(f"not an Avro joey.v1.InferenceLogBatch ({type(exc).__name__}: {exc})") from None
    entries: list[dict[str, Any]] = batch["entries"]
    if not entries:
        raise RecordError("a joey.v1.InferenceLogBatch without entries")
    for i, entry in enumerate(entries):
        # The assayer trusts the batch's own fields for watermarks: entries must agree with them.
        if (entry["workspace"], entry["pipeline"]) != (batch["workspace"], batch["pipeline"]):
            raise RecordError(
                f"entry {i} of a log batch of {batch['workspace']}/{batch['pipeline']} is of "
                f"{bounded_text(entry['workspace'], 100)}/{bounded_text(entry['pipeline'], 100)}"
            )
    # Watermarks come from `latest` alone: a batch whose latest time is not its latest entry's could move
    # them past rows still to come (later) or keep them back (earlier).
    if batch["latest"] != max(entry["time"] for entry in entries):
        raise RecordError(
            f"a log batch's latest time {batch['latest'].isoformat()} is not the time of its latest entry"
        )
    return entries


def log_watermark(
    headers: list[tuple[str, bytes | None]] | None, value: bytes | None
) -> tuple[str, str, datetime]:
    """``(workspace, pipeline, latest time)`` of a ``joey.logs`` record in either format, read from its
    first fields without decoding the rest: what a watermark needs, several times faster than decoding.
    Raises RecordError on bad input."""
    data = value or b""
    if header_value(headers, CONTENT_TYPE_HEADER) != LOG_BATCH_CONTENT_TYPE:
        return _single_watermark(data)
    try:
        workspace_bytes, at = _avro_bytes(data, 0)
        pipeline_bytes, at = _avro_bytes(data, at)
        micros, at = _avro_long(data, at)
        return workspace_bytes.decode(), pipeline_bytes.decode(), _EPOCH + timedelta(microseconds=micros)
    except (IndexError, ValueError, OverflowError) as exc:
        raise RecordError(f"not an Avro joey.v1.InferenceLogBatch ({type(exc).__name__}: {exc})") from None


def _single_watermark(data: bytes) -> tuple[str, str, datetime]:
    """``(workspace, pipeline, time)`` of an encoded InferenceLog, read without decoding the rest.

    What a watermark needs, several times faster than :func:`decode_log`: the fields are read in
    the schema's order (workspace, pipeline, pipeline_version, deployment_id, request_id,
    record_key, time) straight from Avro's binary encoding. Raises RecordError on bad input.
    """
    try:
        workspace_bytes, at = _avro_bytes(data, 0)
        pipeline_bytes, at = _avro_bytes(data, at)
        _, at = _avro_long(data, at)  # pipeline_version
        for _ in range(2):  # deployment_id, request_id
            _, at = _avro_bytes(data, at)
        branch, at = _avro_long(data, at)  # record_key: null or bytes
        if branch not in (0, 1):
            raise ValueError(f"union branch {branch} of record_key")
        if branch == 1:
            _, at = _avro_bytes(data, at)
        micros, at = _avro_long(data, at)
        workspace, pipeline = workspace_bytes.decode(), pipeline_bytes.decode()
        return workspace, pipeline, _EPOCH + timedelta(microseconds=micros)
    # Corrupt bytes trip over whatever they hit: an index past the end, bad UTF-8, a huge time.
    except (IndexError, ValueError, OverflowError) as exc:
        raise RecordError(f"not an Avro joey.v1.InferenceLog ({type(exc).__name__}: {exc})") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _avro_long(data: bytes, at: int) -> tuple[int, int]:
    """A zigzag varint (Avro's int and long) at ``at``, and the position after it."""
    raw = 0
    for shift in range(0, 70, 7):  # a long takes at most 10 bytes
        byte = data[at]
        at += 1
        raw |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (raw >> 1) ^ -(raw & 1), at
    raise ValueError("varint longer than 10 bytes")


def _avro_bytes(data: bytes, at: int) -> tuple[bytes, int]:
    """Avro bytes or string at ``at`` (a length, then the bytes), and the position after them."""
    size, at = _avro_long(data, at)
    if size < 0 or at + size > len(data):
        raise ValueError(f"a length of {size} at byte {at} runs outside the record")
    return data[at : at + size], at + size
