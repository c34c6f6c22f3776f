"""Fuzz target: the Avro log decoders (``decode_log_entries``, ``log_watermark``), of either format,
take mutated and random bytes to a value or a RecordError."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from joey_core.records import (
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    RecordError,
    decode_log,
    decode_log_entries,
    encode_log,
    encode_log_batch,
    log_watermark,
)
from tests.logger.helpers import log_record

_HEADERS = [("content-type", LOG_CONTENT_TYPE.encode())]
_BATCH_HEADERS = [("content-type", LOG_BATCH_CONTENT_TYPE.encode())]
_TEXT = st.text(max_size=12)
_LONG = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_INT = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Avro's timestamp-micros round-trips to the microsecond, in UTC, inside datetime's range.
_TIME = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))
_RECORDS = st.builds(
    lambda i, fields: log_record("p", i) | fields,
    st.integers(min_value=0, max_value=1000),
    st.fixed_dictionaries(
        {
            "workspace": _TEXT,
            "pipeline": _TEXT,
            "pipeline_version": _LONG,
            "request_id": _TEXT,
            "record_key": st.none() | st.binary(max_size=8),
            "time": _TIME,
            "input_partition": _INT,
            "input_offset": _LONG,
            "ok": st.booleans(),
            "error": st.none() | _TEXT,
            "raw_input": st.none() | st.binary(max_size=8),
            "check_failures": st.lists(_TEXT, max_size=3),
            "models": st.lists(
                st.fixed_dictionaries({"name": _TEXT, "version": _LONG, "sha256": _TEXT}), max_size=2
            ),
            "elapsed_ns": st.lists(_LONG, max_size=3),
        }
    ),
)


_BATCHES = st.lists(_RECORDS, min_size=1, max_size=4).map(
    lambda entries: [
        e | {"workspace": entries[0]["workspace"], "pipeline": entries[0]["pipeline"]} for e in entries
    ]
)
_FORMATS = st.sampled_from([_HEADERS, _BATCH_HEADERS])


def decodes_or_refuses(headers: list[tuple[str, bytes | None]], data: bytes) -> None:
    try:
        entries = decode_log_entries(headers, data)
        assert entries and all(isinstance(entry, dict) for entry in entries)
    except RecordError as exc:
        assert str(exc)
    try:
        workspace, pipeline, at = log_watermark(headers, data)
    except RecordError as exc:
        assert str(exc)
    else:
        assert isinstance(workspace, str) and isinstance(pipeline, str) and isinstance(at, datetime)


@given(_RECORDS)
def test_round_trip(record: dict) -> None:
    data = encode_log(record)
    assert decode_log(data) == record
    assert decode_log_entries(_HEADERS, data) == [record]
    assert log_watermark(_HEADERS, data) == (record["workspace"], record["pipeline"], record["time"])


@given(_BATCHES)
def test_batch_round_trip(entries: list[dict]) -> None:
    data = encode_log_batch(entries)
    assert decode_log_entries(_BATCH_HEADERS, data) == entries
    latest = max(e["time"] for e in entries)
    assert log_watermark(_BATCH_HEADERS, data) == (entries[0]["workspace"], entries[0]["pipeline"], latest)


def encoded(headers: list[tuple[str, bytes | None]], entries: list[dict]) -> bytes:
    return encode_log(entries[0]) if headers is _HEADERS else encode_log_batch(entries)


@given(
    _FORMATS,
    _BATCHES,
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_records(
    headers: list[tuple[str, bytes | None]], entries: list[dict], edits: list[tuple[int, int]]
) -> None:
    data = bytearray(encoded(headers, entries))
    for at, byte in edits:
        data[at % len(data)] = byte
    decodes_or_refuses(headers, bytes(data))


@given(_FORMATS, _BATCHES, st.integers(min_value=0))
def test_truncated_records(headers: list[tuple[str, bytes | None]], entries: list[dict], cut: int) -> None:
    data = encoded(headers, entries)
    decodes_or_refuses(headers, data[: cut % len(data)])


@given(_FORMATS, st.binary(max_size=300))
@example(
    _HEADERS, b"\x00\x00\x00\x00\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
)  # a time past datetime's range
@example(_HEADERS, b"\x00\x00" + b"\x80" * 11)  # a varint longer than a long
@example(_BATCH_HEADERS, b"\x00\x00\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # a latest time past year 9999
@example(_BATCH_HEADERS, b"\x02a\x02b\x00\x01\x00")  # an entry count but no entry
def test_random_bytes(headers: list[tuple[str, bytes | None]], data: bytes) -> None:
    decodes_or_refuses(headers, data)
