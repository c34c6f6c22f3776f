"""The records a replica writes for each input: output or error (JSON) and the inference log (Avro).

Formats are described in :mod:`joey_core.records`; everything here is a pure function of the
deployment, where the input came from, and its result.

:func:`answered` is what a replica sends for a batch: a reply per input and the batch's log entries in
as few log records as fit the broker's message limit. It never raises for one record: an input whose
output, error or log entry cannot be encoded, or would not fit in a record, is answered by a bounded
error record instead (its reason, and an excerpt of the raw input).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from joey_core import kafka, records, topics
from joey_core.kafka import ConsumedRecord
from joey_engine.deployment import Deployment
from joey_engine.pipeline import Failure, Result, Success

Headers = kafka.Headers


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


def log_entry(
    deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime
) -> dict[str, object]:
    """The inference log entry of one input, as a log record holds it (:func:`log_record`)."""
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


LOG_HEADERS: Headers = [(records.CONTENT_TYPE_HEADER, records.LOG_BATCH_CONTENT_TYPE.encode())]


def log_record(entries: Sequence[dict[str, object]]) -> Produced:
    """One ``joey.logs`` record holding ``entries`` (of one deployment), keyed by the first one's request id.

    Raises whatever encoding raises (an entry fastavro cannot encode)."""
    key = str(entries[0]["request_id"]).encode()
    return Produced(topics.LOGS, records.encode_log_batch(entries), key, LOG_HEADERS)


@dataclass(frozen=True)
class LogBatch:
    """A log record of a batch and the inputs it logs, by index in the batch."""

    record: Produced
    inputs: tuple[int, ...]
    entries: tuple[dict[str, object], ...]
    """The entries it holds, of those inputs."""


@dataclass(frozen=True)
class Answered:
    """What a replica produces for a batch of inputs."""

    results: list[Result]
    """Each input's result as its records report it: its own, or the bounded failure that replaced it."""
    replies: list[Produced]
    """Each input's output or error record, in order."""
    logs: list[LogBatch]
    """The log records: each input logged exactly once, in as few records as fit the limit."""
    bounded: int
    """How many inputs are answered by a bounded error because their own records could not be."""


def answered(
    deployment: Deployment,
    sources: Sequence[ConsumedRecord],
    results: Sequence[Result],
    now: datetime,
    limit: int,
) -> Answered:
    """The replies and the log records answering ``sources``, each record at most ``limit`` bytes
    (``kafka.max_record_bytes``).

    Never raises for one input: an input whose reply or log entry cannot be encoded, or would not fit in
    a record alone, is answered by a bounded error and a bounded failure log instead (:func:`bounded`),
    decided here, before anything is produced."""
    names = deployment.topics
    replies: list[Produced | None] = []
    pending: list[tuple[int, dict[str, object]]] = []
    why: dict[int, str] = {}
    for i, (source, result) in enumerate(zip(sources, results, strict=True)):
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
                    names.errors,
                    error_value(deployment, source, result, now),
                    source.key,
                    reply_headers(source),
                )
            entry = log_entry(deployment, source, result, now)
        # Whatever one record's values make the encoders raise (nesting too deep for the JSON encoder)
        # fails that record alone.
        except Exception as exc:
            why[i] = _unencodable(exc)
            replies.append(None)
            continue
        replies.append(reply)
        if reply.size > limit:
            why[i] = _too_large("output" if isinstance(result, Success) else "error", reply.size, limit)
        else:
            pending.append((i, entry))
    logs, unlogged = _log_batches(pending, limit)
    why |= unlogged
    answers = list(results)
    if why:
        stand_ins = []
        for i in sorted(why):
            answers[i], replies[i], entry = bounded(deployment, sources[i], results[i], why[i], now)
            stand_ins.append((i, entry))
        more, refused = _log_batches(stand_ins, limit)
        if refused:  # a bounded entry is a few KiB of encodable text: only a bug gets here
            raise RuntimeError(f"bounded log entries could not be encoded: {refused}")
        logs += more
    return Answered(answers, [r for r in replies if r is not None], logs, len(why))


def _unencodable(exc: Exception) -> str:
    return f"its records could not be encoded ({type(exc).__name__}: {exc})"


def _too_large(what: str, size: int, limit: int) -> str:
    return (
        f"its {what} record would be {size} bytes, over the {limit}-byte limit of a record "
        f"(the producer's message.max.bytes less Kafka's overhead)"
    )


def _log_batches(
    pending: list[tuple[int, dict[str, object]]], limit: int
) -> tuple[list[LogBatch], dict[int, str]]:
    """``pending`` entries (by input index) in as few log records as fit ``limit``, and why each entry that
    fits in none (it cannot be encoded, or is too large alone) was left out.

    All are encoded at once; a batch too large is split in as many parts as its size asks, one that fails
    to encode is split in halves, until the parts fit or an entry fails alone."""
    logs: list[LogBatch] = []
    left_out: dict[int, str] = {}
    parts = [pending] if pending else []
    while parts:
        part = parts.pop()
        try:
            record = log_record([entry for _, entry in part])
        except Exception as exc:
            if len(part) == 1:
                left_out[part[0][0]] = _unencodable(exc)
                continue
            pieces = 2
        else:
            if record.size <= limit:
                logs.append(LogBatch(record, tuple(i for i, _ in part), tuple(e for _, e in part)))
                continue
            if len(part) == 1:
                left_out[part[0][0]] = _too_large("log", record.size, limit)
                continue
            pieces = min(len(part), max(2, -(-record.size // limit)))
        step = -(-len(part) // pieces)
        # Reversed, so the parts are popped, and their records produced, in input order.
        parts += reversed([part[k : k + step] for k in range(0, len(part), step)])
    return logs, left_out


def bounded(
    deployment: Deployment, source: ConsumedRecord, result: Result, why: str, now: datetime
) -> tuple[Failure, Produced, dict[str, object]]:
    """An error record and a failure log entry of a few KiB at most whatever the input: the reason (the
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
    entry = log_entry(deployment, source, failure, now) | {"record_key": key, "raw_input": excerpt}
    return failure, Produced(deployment.topics.errors, error, key, reply_headers(source)), entry


def _clean(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with anything UTF-8 cannot encode (lone surrogates) replaced."""
    return records.bounded_text(text, limit).encode("utf-8", errors="replace").decode("utf-8")
