"""Fuzz target: the Avro log decoders take mutated and random bytes to a value or a RecordError."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from joey_core.records import (
    LOG_CONTENT_TYPE,
    RecordError,
    decode_log,
    decode_log_record,
    encode_log,
    log_event_time,
)
from tests.logger.helpers import log_record

_HEADERS = [("content-type", LOG_CONTENT_TYPE.encode())]
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


def decodes_or_refuses(data: bytes) -> None:
    try:
        assert isinstance(decode_log_record(_HEADERS, data), dict)
    except RecordError as exc:
        assert str(exc)
    try:
        workspace, pipeline, at = log_event_time(data)
    except RecordError as exc:
        assert str(exc)
    else:
        assert isinstance(workspace, str) and isinstance(pipeline, str) and isinstance(at, datetime)


@given(_RECORDS)
def test_round_trip(record: dict) -> None:
    data = encode_log(record)
    assert decode_log(data) == record
    assert decode_log_record(_HEADERS, data) == record
    assert log_event_time(data) == (record["workspace"], record["pipeline"], record["time"])


@given(_RECORDS, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_records(record: dict, edits: list[tuple[int, int]]) -> None:
    data = bytearray(encode_log(record))
    for at, byte in edits:
        data[at % len(data)] = byte
    decodes_or_refuses(bytes(data))


@given(_RECORDS, st.integers(min_value=0))
def test_truncated_records(record: dict, cut: int) -> None:
    data = encode_log(record)
    decodes_or_refuses(data[: cut % len(data)])


@given(st.binary(max_size=300))
@example(b"\x00\x00\x00\x00\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")  # a time past datetime's range
@example(b"\x00\x00" + b"\x80" * 11)  # a varint longer than a long
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)
