from __future__ import annotations

import contextlib
import io
import math
from datetime import UTC, datetime

import fastavro
import numpy as np
import pytest

from joey_core import records


def test_decode_input_accepts_a_json_object() -> None:
    assert records.decode_input(b'{"features": [1, 2]}') == {"features": [1, 2]}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty record"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2, 3]", "got list"),
        (b'"text"', "got str"),
    ],
)
def test_decode_input_names_the_problem(raw: bytes | None, reason: str) -> None:
    with pytest.raises(records.RecordError, match=reason):
        records.decode_input(raw)


def test_dumps_turns_numpy_and_non_finite_values_into_json() -> None:
    value = {"a": np.float32(1.5), "b": np.array([[1, 2]], dtype=np.int64), "c": math.nan, "d": [np.inf, 2.0]}
    assert records.dumps(value) == b'{"a":1.5,"b":[[1,2]],"c":null,"d":[null,2.0]}'


def log(**fields: object) -> dict[str, object]:
    return {
        "workspace": "default",
        "pipeline": "p",
        "pipeline_version": 3,
        "deployment_id": "d-1",
        "request_id": "r-1",
        "record_key": b"k",
        "time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "input_topic": "joey.default.p.inputs",
        "input_partition": 2,
        "input_offset": 41,
        "ok": False,
        "error": "missing input 'features'",
        "inputs": None,
        "raw_input": b"\x00garbage",
        "outputs": None,
        "shadow_outputs": None,
        "check_failures": [],
        "models": [{"name": "m", "version": 1, "sha256": "ab" * 32}],
        "elapsed_ns": [120, 340],
    } | fields


def test_log_record_round_trips_through_avro() -> None:
    record = log()
    assert records.decode_log(records.encode_log(record)) == record


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"record_key": None},
        {"record_key": b"\xff" * 300, "workspace": "équipe", "pipeline": "ü" * 70},
        {"pipeline_version": 2**40, "request_id": "r" * 1000},
        {"time": datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC)},
        {"time": datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)},
    ],
)
def test_the_event_time_is_read_without_decoding_the_whole_log_record(fields: dict[str, object]) -> None:
    record = log(**fields)
    assert records.log_watermark(None, records.encode_log(record)) == (
        record["workspace"],
        record["pipeline"],
        record["time"],
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x10ab",
        b"\xff\xff\xff",
        b"\x02a\x02b\x02\x00\x00\x06",
        b"\x02a\x02b\x02\x00\x00\x00" + b"\xff" * 12,  # a varint that never ends
        b"\x02a\x02b\x02\x00\x00\x00\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a time past year 9999
    ],
)
def test_a_record_that_is_not_a_log_has_no_event_time(data: bytes) -> None:
    with pytest.raises(records.RecordError, match="not an Avro"):
        records.log_watermark(None, data)


def test_header_value_finds_the_request_id() -> None:
    headers = [("other", b"x"), (records.REQUEST_ID_HEADER, b"abc")]
    assert records.header_value(headers, records.REQUEST_ID_HEADER) == "abc"
    assert records.header_value(None, records.REQUEST_ID_HEADER) is None


def test_corrupt_log_records_raise_only_record_errors() -> None:
    rng = np.random.default_rng(4)
    data = bytearray(records.encode_log(log()))
    for _ in range(5000):
        corrupt = bytearray(data)
        corrupt[rng.integers(0, 40)] = rng.integers(0, 256)
        # Any other exception fails the test: the assayer would stop on it.
        with contextlib.suppress(records.RecordError):
            records.log_watermark(None, bytes(corrupt))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "record is not valid JSON: nested too deeply"),
        # Deeper than json takes, shallower than orjson's 1024: refused as json refuses it.
        (b'{"x":' + b"[" * 1010 + b"]" * 1010 + b"}", "record is not valid JSON: nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "record is not valid JSON: nested too deeply"),
        (b'{"x": ' + b"9" * 5000 + b"}", "record is not valid JSON: Exceeds the limit"),
        (b'{"x": 1, "x": 2}', "record has the key 'x' more than once in one object"),
        (b'{"x": {"y": 1, "y": 1}}', "record has the key 'y' more than once in one object"),
        (b'{"x": 1, "\\u0078": 2}', "record has the key 'x' more than once in one object"),
        (b'{"t": "12:00", "t": 1}', "record has the key 't' more than once in one object"),
        (b'{"x": [nan]}', "record is not valid JSON"),
        (b"", "record is not valid JSON"),
    ],
)
def test_decode_input_raises_only_record_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(records.RecordError) as error:
        records.decode_input(raw)
    assert str(error.value).startswith(reason), str(error.value)
    assert len(str(error.value)) < 400


def test_decode_input_keeps_python_spellings_of_non_finite_numbers_for_validation_to_name() -> None:
    row = records.decode_input(b'{"x": [NaN, Infinity, -Infinity]}')
    assert [math.isnan(row["x"][0]), row["x"][1:]] == [True, [math.inf, -math.inf]]


def _bounded(raw: bytes) -> str:
    return records.parse_request_id(raw)[0]


def _problem(raw: bytes) -> str | None:
    return records.parse_request_id(raw)[1]


def test_request_ids_are_bounded_and_their_problems_named() -> None:
    assert records.parse_request_id(b"r-1") == ("r-1", None)
    bad = _bounded(b"\xff-1")
    assert bad.startswith("\ufffd-1...sha256:"), bad
    assert bad != _bounded(b"\xfe-1"), "ids differing in their bad bytes stay distinct"
    limit = records.REQUEST_ID_MAX_BYTES
    worst = _bounded(b"\xff" * limit)
    assert len(worst.encode()) <= limit, "bad bytes replaced by U+FFFD cannot grow an id past the limit"
    assert _problem(b"\xff-1") == "request-id header is not UTF-8 (byte 0)"
    assert _problem(b"r" * limit) is None
    assert _problem(b"r" * (limit + 1)) == (
        f"request-id header is {limit + 1} bytes, over the {limit} allowed"
    )
    long_one, other = _bounded(b"r" * 100_000), _bounded(b"r" * 100_001)
    assert len(long_one.encode()) <= limit and long_one.startswith("r" * 256 + "...sha256:")
    assert long_one != other, "cut ids stay distinct"
    assert _bounded(b"r" * 100_000) == long_one, "and deterministic"


BATCH_HEADERS = [(records.CONTENT_TYPE_HEADER, records.LOG_BATCH_CONTENT_TYPE.encode())]


def batch_entries(n: int = 3) -> list[dict[str, object]]:
    return [
        log(request_id=f"r-{i}", input_offset=i, time=datetime(2026, 1, 2, 3, 4, 5 - i, tzinfo=UTC))
        for i in range(n)
    ]


def test_a_log_batch_round_trips_and_its_watermark_is_its_latest_entry() -> None:
    entries = batch_entries()
    value = records.encode_log_batch(entries)
    assert records.decode_log_entries(BATCH_HEADERS, value) == entries
    assert records.log_watermark(BATCH_HEADERS, value) == (
        "default",
        "p",
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


@pytest.mark.parametrize("content_type", [records.LOG_CONTENT_TYPE, None])
def test_a_single_log_record_still_reads_as_one_entry(content_type: str | None) -> None:
    headers = [] if content_type is None else [(records.CONTENT_TYPE_HEADER, content_type.encode())]
    value = records.encode_log(log())
    assert records.decode_log_entries(headers, value) == [log()]
    assert records.log_watermark(headers, value) == ("default", "p", log()["time"])
    assert records.is_log_record(headers)


def test_a_log_batch_of_nothing_or_of_two_pipelines_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        records.encode_log_batch([])
    with pytest.raises(ValueError, match="one workspace and pipeline"):
        records.encode_log_batch([log(), log(pipeline="q")])


def _raw_batch(workspace: str, pipeline: str, latest: datetime, entries: list[dict[str, object]]) -> bytes:
    """A batch as any producer could write it, bypassing encode_log_batch's own checks."""
    buffer = io.BytesIO()
    batch = {"workspace": workspace, "pipeline": pipeline, "latest": latest, "entries": entries}
    fastavro.schemaless_writer(buffer, records.log_batch_schema(), batch)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (
            _raw_batch("default", "q", datetime(2030, 1, 1, tzinfo=UTC), [log()]),
            BATCH_HEADERS,
            "is of default/p",
        ),
        (
            _raw_batch("default", "p", datetime(2020, 1, 1, tzinfo=UTC), [log()]),
            BATCH_HEADERS,
            "not the time",
        ),
        (
            _raw_batch("default", "p", datetime(2030, 1, 1, tzinfo=UTC), [log()]),
            BATCH_HEADERS,
            "not the time",
        ),
        (_raw_batch("default", "p", datetime(2030, 1, 1, tzinfo=UTC), []), BATCH_HEADERS, "without entries"),
        (b"", BATCH_HEADERS, "empty record"),
        (b"\x02a\x02b", BATCH_HEADERS, "not an Avro joey.v1.InferenceLogBatch"),
        (
            records.encode_log(log()),
            [(records.CONTENT_TYPE_HEADER, b"application/json")],
            "unexpected content-type",
        ),
    ],
)
def test_a_log_record_that_cannot_be_read_says_why(
    value: bytes, headers: list[tuple[str, bytes | None]], reason: str
) -> None:
    with pytest.raises(records.RecordError, match=reason):
        records.decode_log_entries(headers, value)


def test_corrupt_log_batches_raise_only_record_errors() -> None:
    rng = np.random.default_rng(5)
    data = bytearray(records.encode_log_batch(batch_entries(4)))
    for _ in range(3000):
        corrupt = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            corrupt[rng.integers(0, len(corrupt))] = rng.integers(0, 256)
        cut = bytes(corrupt[: rng.integers(0, len(corrupt) + 1)])
        # Any other exception fails the test: the logger or the assayer would stop on it.
        for value in (bytes(corrupt), cut):
            with contextlib.suppress(records.RecordError):
                records.decode_log_entries(BATCH_HEADERS, value)
            with contextlib.suppress(records.RecordError):
                records.log_watermark(BATCH_HEADERS, value)
