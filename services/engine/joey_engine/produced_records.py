"""The records a replica writes for each input: output or error (JSON) and the inference log (Avro).

Formats are described in :mod:`joey_core.records`; everything here is a pure function of the
deployment, where the input came from, and its result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from typing import cast

from confluent_kafka import Message

from joey_core import records
from joey_engine.deployment import Deployment
from joey_engine.pipeline import Failure, Result, Success

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True)
class Source:
    """An input record's identity, carried to every record derived from it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    request_id: str
    deadline_ms: float | None = None
    """When the caller stops waiting (epoch ms), from the record's deadline header."""

    @classmethod
    def of(cls, message: Message) -> Source:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError(f"not a consumed record: {message.error()}")
        # Consumed records always carry headers as a list of (name, bytes) pairs.
        headers = cast(list[tuple[str, bytes | None]], message.headers())
        request_id = records.header_value(headers, records.REQUEST_ID_HEADER)
        deadline = records.header_value(headers, records.DEADLINE_HEADER)
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=message.key(),
            value=message.value(),
            request_id=request_id or f"{topic}/{partition}/{offset}",
            deadline_ms=_deadline_ms(deadline),
        )

    def expired(self, now_ms: float) -> Failure | None:
        """A failure when the caller's deadline passed before the record was reached, else None."""
        if self.deadline_ms is None or now_ms <= self.deadline_ms:
            return None
        late = now_ms - self.deadline_ms
        return Failure(
            f"{records.DEADLINE_EXCEEDED} {late:.0f} ms before a replica reached the record; not processed",
            None,
        )

    @property
    def headers(self) -> Headers:
        return [(records.REQUEST_ID_HEADER, self.request_id.encode())]

    @cached_property
    def value_json(self) -> str:
        """The value as strict JSON text; only valid for a value that parsed as a JSON object."""
        return records.strict_json_text(self.value, lambda: json.loads(self.value or b"null"))


def _deadline_ms(text: str | None) -> float | None:
    # A malformed deadline cannot be honoured; the record is processed as if it had none.
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _metadata_text(deployment: Deployment, source: Source, result: Result) -> str:
    elapsed = (
        f',"elapsed_ns":[{",".join(map(str, result.elapsed_ns))}]' if isinstance(result, Success) else ""
    )
    position = f'"partition":{source.partition},"offset":{source.offset}'
    # With split steps the models differ per record, so they are not among the shared members.
    models = f',"models":{deployment.models_json(result.split)}' if deployment.splits else ""
    return f"{{{deployment.shared_metadata_json}{models},{position}{elapsed}}}"


@lru_cache(maxsize=4)
def _time_text(now: datetime) -> str:
    return now.isoformat(timespec="microseconds")


_NO_CHECKS = '"check_failures":[]'


@lru_cache(maxsize=1024)
def _checks_text(names: tuple[str, ...], failures: tuple[str, ...]) -> str:
    """``check_failures`` and the ``anomaly`` object of a pipeline with checks, as JSON members.

    Records mostly share a handful of outcomes (usually no anomaly), so each is encoded once.
    """
    anomaly: dict[str, int | bool] = {"count": len(failures)}
    # A check named "count" would hide the count; its flag is still in check_failures.
    anomaly.update((name, name in failures) for name in names if name != "count")
    return f'"check_failures":{records.dumps_text(list(failures))},"anomaly":{records.dumps_text(anomaly)}'


def _shadow_text(result: Success) -> str:
    """``shadow`` and, when a challenger failed, ``shadow_errors``, as JSON members with a trailing comma."""
    errors = f'"shadow_errors":{records.dumps_text(result.shadow_errors)},' if result.shadow_errors else ""
    return f'"shadow":{result.shadow_json},{errors}'


def output_value(deployment: Deployment, source: Source, result: Success, now: datetime) -> bytes:
    # The engine's per-record hot path: the record is assembled from JSON texts that are each
    # produced once (the input's own bytes, the outputs shared with the log, per-deployment
    # metadata) instead of encoding one nested dict per record.
    names = deployment.check_names
    checks = _checks_text(names, result.check_failures) if names else _NO_CHECKS
    shadow = "" if result.shadow is None else _shadow_text(result)
    return (
        f'{{"time":"{_time_text(now)}","request_id":{json.dumps(source.request_id)},'
        f'"in":{source.value_json},"out":{result.outputs_json},'
        f"{shadow}{checks},"
        f'"metadata":{_metadata_text(deployment, source, result)}}}'
    ).encode()


def _raw_text(failure: Failure, source: Source) -> str | None:
    if failure.inputs is not None or source.value is None:
        return None
    return source.value.decode("utf-8", errors="replace")


def error_value(deployment: Deployment, source: Source, result: Failure, now: datetime) -> bytes:
    body = records.dumps_text(
        {
            "time": _time_text(now),
            "request_id": source.request_id,
            "error": result.reason,
            "input": result.inputs,
            "raw_input": _raw_text(result, source),
        }
    )
    # The metadata members are already JSON text (shared with output records): append, don't re-encode.
    return f'{body[:-1]},"metadata":{_metadata_text(deployment, source, result)}}}'.encode()


def log_value(deployment: Deployment, source: Source, result: Result, now: datetime) -> bytes:
    if isinstance(result, Success):
        outcome = {
            "ok": True,
            "error": None,
            "outputs": result.outputs_json,
            "shadow_outputs": None if result.shadow is None else result.shadow_json,
            "elapsed_ns": list(result.elapsed_ns),
        }
    else:
        outcome = {
            "ok": False,
            "error": result.reason,
            "outputs": None,
            "shadow_outputs": None,
            "elapsed_ns": [],
        }
    inputs = None if result.inputs is None else source.value_json
    return records.encode_log(
        {
            "workspace": deployment.workspace,
            "pipeline": deployment.pipeline,
            "pipeline_version": deployment.pipeline_version,
            "deployment_id": deployment.deployment_id,
            "request_id": source.request_id,
            "record_key": source.key,
            "time": now,
            "input_topic": source.topic,
            "input_partition": source.partition,
            "input_offset": source.offset,
            "inputs": inputs,
            "raw_input": source.value if inputs is None else None,
            "check_failures": list(result.check_failures) if isinstance(result, Success) else [],
            "models": deployment.models_of(result.split),
        }
        | outcome
    )


LOG_HEADERS: Headers = [(records.CONTENT_TYPE_HEADER, records.LOG_CONTENT_TYPE.encode())]
