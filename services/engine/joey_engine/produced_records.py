"""The records a replica writes for each input: output or error (JSON) and the inference log (Avro).

Formats are described in :mod:`joey_core.records`; everything here is a pure function of the
deployment, where the input came from, and its result.

:func:`produced` is what a replica sends for one input, and it never raises for one record: a record
whose output, error or log cannot be encoded, or would not fit the broker's message limit, is answered
by a bounded error record instead (its reason, and an excerpt of the raw input).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from joey_core import kafka, records, topics
from joey_core.kafka import ConsumedRecord
from joey_engine.deployment import Deployment
from joey_engine.pipeline import Failure, Result, Success

Headers = list[tuple[str, str | bytes | None]]


EXCERPT_BYTES = 1024
"""How much of an input a bounded error record and its log carry."""
REASON_MAX_CHARS = 4096
"""Longest reason a bounded error record carries (a user exception's message can be any size)."""
KEY_MAX_BYTES = 1024
"""Longest record key a bounded error record keeps; a longer one is replaced by its digest."""


@dataclass(frozen=True)
class Produced:
    """One record to produce."""

    topic: str
    value: bytes
    key: bytes | None
    headers: Headers

    @property
    def size(self) -> int:
        return kafka.record_size(self.key, self.value, self.headers)


def refused(source: ConsumedRecord, now_ms: float) -> Failure | None:
    """A failure for a record that is not to be run: its request id is unusable or its deadline passed."""
    if source.request_id_problem is not None:
        return Failure(source.request_id_problem, None)
    return expired(source, now_ms)


def expired(source: ConsumedRecord, now_ms: float) -> Failure | None:
    """A failure when the caller's deadline passed before the record was reached, else None."""
    if source.deadline_ms is None or now_ms <= source.deadline_ms:
        return None
    late = now_ms - source.deadline_ms
    return Failure(
        f"{records.DEADLINE_EXCEEDED} {late:.0f} ms before a replica reached the record; not processed",
        None,
    )


def reply_headers(source: ConsumedRecord) -> Headers:
    """Headers of the output or error record answering ``source``: its request id."""
    return [(records.REQUEST_ID_HEADER, source.request_id.encode())]


def _metadata_text(deployment: Deployment, source: ConsumedRecord, result: Result) -> str:
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


def output_value(deployment: Deployment, source: ConsumedRecord, result: Success, now: datetime) -> bytes:
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


def _raw_text(failure: Failure, source: ConsumedRecord) -> str | None:
    if failure.inputs is not None or source.value is None:
        return None
    return source.value.decode("utf-8", errors="replace")


def error_value(
    deployment: Deployment,
    source: ConsumedRecord,
    result: Failure,
    now: datetime,
    raw_input: str | None = None,
) -> bytes:
    """The error record answering ``source``; ``raw_input`` in place of its whole undecoded input if given."""
    body = records.dumps_text(
        {
            "time": _time_text(now),
            "request_id": source.request_id,
            "error": result.reason,
            "input": result.inputs,
            "raw_input": raw_input if raw_input is not None else _raw_text(result, source),
        }
    )
    # The metadata members are already JSON text (shared with output records): append, don't re-encode.
    return f'{body[:-1]},"metadata":{_metadata_text(deployment, source, result)}}}'.encode()


def log_value(deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime) -> bytes:
    return records.encode_log(_log_fields(deployment, source, result, now))


def _log_fields(
    deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime
) -> dict[str, object]:
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
    return {
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
    } | outcome


LOG_HEADERS: Headers = [(records.CONTENT_TYPE_HEADER, records.LOG_CONTENT_TYPE.encode())]


def produced(
    deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime, limit: int
) -> tuple[Result, list[Produced]]:
    """The reply (output or error record) and the log record answering ``source``, each at most
    ``limit`` bytes (``kafka.max_record_bytes``), and the result they report: ``result``, or the failure
    that replaced it when its records could not be encoded or were too large."""
    names = deployment.topics
    try:
        if isinstance(result, Success):
            reply = Produced(
                names.outputs,
                output_value(deployment, source, result, now),
                source.key,
                reply_headers(source),
            )
        else:
            reply = Produced(
                names.errors, error_value(deployment, source, result, now), source.key, reply_headers(source)
            )
        log = Produced(
            topics.LOGS, log_value(deployment, source, result, now), source.request_id.encode(), LOG_HEADERS
        )
    # Whatever one record's values make the encoders raise (a lone surrogate for Avro, nesting too deep
    # for the JSON encoder) fails that record alone.
    except Exception as exc:
        why = f"its records could not be encoded ({type(exc).__name__}: {exc})"
        return bounded(deployment, source, result, why, now)
    for record, what in ((reply, "output" if isinstance(result, Success) else "error"), (log, "log")):
        if record.size > limit:
            why = (
                f"its {what} record would be {record.size} bytes, over the {limit}-byte limit of a record "
                f"(the producer's message.max.bytes less Kafka's overhead)"
            )
            return bounded(deployment, source, result, why, now)
    return result, [reply, log]


def bounded(
    deployment: Deployment, source: ConsumedRecord, result: Result, why: str, now: datetime
) -> tuple[Failure, list[Produced]]:
    """An error record and a failure log of a few KiB at most whatever the input: the reason (the
    original failure's first), the input's first :data:`EXCERPT_BYTES` as ``raw_input``."""
    size = len(source.value or b"")
    excerpt = (source.value or b"")[:EXCERPT_BYTES]
    shown = f"raw_input holds its first {len(excerpt)} of {size} bytes"
    why = _clean(why, REASON_MAX_CHARS // 4)
    reason = why if isinstance(result, Success) else f"{_clean(result.reason, REASON_MAX_CHARS)}; {why}"
    failure = Failure(f"{reason}; {shown}", None, result.split)
    key = source.key
    if key is not None and len(key) > KEY_MAX_BYTES:
        key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    error = error_value(deployment, source, failure, now, raw_input=excerpt.decode("utf-8", errors="replace"))
    log = records.encode_log(
        _log_fields(deployment, source, failure, now) | {"record_key": key, "raw_input": excerpt}
    )
    return failure, [
        Produced(deployment.topics.errors, error, key, reply_headers(source)),
        Produced(topics.LOGS, log, source.request_id.encode(), LOG_HEADERS),
    ]


def _clean(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with anything UTF-8 cannot encode (lone surrogates) replaced."""
    return records.bounded_text(text, limit).encode("utf-8", errors="replace").decode("utf-8")
