"""Consumed ``joey.logs`` records as plain typed values, and their decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from joey_core.records import CONTENT_TYPE_HEADER, LOG_CONTENT_TYPE, RecordError, decode_log, header_value

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class LogMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    @classmethod
    def from_kafka(cls, message: Message) -> LogMessage:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError("consumed message has no topic, partition or offset")
        raw = message.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]
        return cls(topic, partition, offset, message.key(), message.value(), headers)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def decode(self) -> dict[str, Any]:
        """The InferenceLog record; raise RecordError naming what is wrong."""
        content_type = header_value(self.headers, CONTENT_TYPE_HEADER)
        if content_type is not None and content_type != LOG_CONTENT_TYPE:
            raise RecordError(f"unexpected content-type {content_type!r}, expected {LOG_CONTENT_TYPE!r}")
        if not self.value:
            raise RecordError("empty record: expected an Avro joey.v1.InferenceLog")
        try:
            return decode_log(self.value)
        # fastavro reports corrupt input with whatever the bytes happen to trip over (EOFError,
        # IndexError, UnicodeDecodeError, ...), so every failure is a reason to dead-letter.
        except Exception as exc:
            raise RecordError(f"not an Avro joey.v1.InferenceLog ({type(exc).__name__}: {exc})") from None
