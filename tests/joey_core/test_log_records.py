from __future__ import annotations

import pytest

from joey_core.kafka import ConsumedRecord
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_CONTENT_TYPE,
    RecordError,
    decode_log_entries,
    encode_log,
)
from tests.logger.helpers import log_record


def message(value: bytes | None, content_type: str | None = LOG_CONTENT_TYPE) -> ConsumedRecord:
    headers = [] if content_type is None else [(CONTENT_TYPE_HEADER, content_type.encode())]
    return ConsumedRecord("joey.logs", 2, 41, b"key", value, headers)


def decode(record: ConsumedRecord) -> dict:
    [entry] = decode_log_entries(record.headers, record.value)
    return entry


def test_a_log_record_decodes() -> None:
    record = log_record("p", 7, raw_input=b"\x00raw", inputs=None)
    decoded = decode(message(encode_log(record)))
    assert decoded == record


def test_a_record_without_content_type_still_decodes() -> None:
    assert decode(message(encode_log(log_record("p", 1)), content_type=None))["request_id"] == "req-1"


@pytest.mark.parametrize(
    ("value", "content_type", "reason"),
    [
        (None, LOG_CONTENT_TYPE, "empty record"),
        (b"", LOG_CONTENT_TYPE, "empty record"),
        (b"not avro at all", LOG_CONTENT_TYPE, "not an Avro joey.v1.InferenceLog (EOFError"),
        (b"\xff" * 40, LOG_CONTENT_TYPE, "not an Avro joey.v1.InferenceLog"),
        (b"{}", "application/json", "unexpected content-type 'application/json'"),
    ],
)
def test_undecodable_records_name_the_problem(value: bytes | None, content_type: str, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode(message(value, content_type))
    assert reason in str(caught.value)


def test_where_names_topic_partition_and_offset() -> None:
    assert message(b"x").where() == "joey.logs[2]@41"
