"""Hostile records on a deployed pipeline's inputs topic, against the real broker, Redis and an engine
with real replica processes: each bad record fails alone with its reason, every good one around them is
answered and logged exactly once, and no replica restarts; a record that kills its replica is
dead-lettered after the allowed attempts."""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from joey_core import heartbeats, kafka, records, topics
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2
from joey_engine.service import Engine
from joey_engine.settings import EngineSettings
from tests.conftest import wait_until
from tests.engine.test_engine import TopicReader, deploy, log_entries, replicas, request_id

TIMEOUT = 120.0
BIG = 1_200_000
"""Bigger than the default message.max.bytes (1 MB); the embedded broker accepts it, like a cluster
whose topic allows larger records."""

GOOD_FEATURES = [5.1, 3.5, 1.4, 0.2]

# name -> (value, request-id header, the start of the reason)
HOSTILE: dict[str, tuple[bytes | None, bytes, str]] = {
    "deep-array": (
        b'{"features":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"",
        "record is not valid JSON: nested too deeply",
    ),
    "deep-object": (
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"",
        "record is not valid JSON: nested too deeply",
    ),
    "huge-integer": (b'{"features":[1,2,3,' + b"9" * 5000 + b"]}", b"", "record is not valid JSON"),
    "nan": (b'{"features":[NaN,1,2,3]}', b"", "input 'features' contains NaN/inf"),
    "minus-infinity": (b'{"features":[1,-Infinity,2,3]}', b"", "input 'features' contains NaN/inf"),
    "overflowing-float": (b'{"features":[1e999,1,2,3]}', b"", "input 'features' contains NaN/inf"),
    "lowercase-nan": (b'{"features":[nan,1,2,3]}', b"", "record is not valid JSON"),
    "inf-word": (b'{"features":[inf,1,2,3]}', b"", "record is not valid JSON"),
    "duplicate-key": (
        b'{"features":[1,2,3,4],"features":[5,6,7,8]}',
        b"",
        "record has the key 'features' more than once",
    ),
    "nested-duplicate": (
        b'{"features":[1,2,3,4],"meta":{"a":1,"a":2}}',
        b"",
        "record has the key 'a' more than once",
    ),
    "string-element": (b'{"features":[1,"2",3,4]}', b"", "input 'features' must hold float32 values"),
    "object-value": (b'{"features":{"a":1}}', b"", "input 'features' must hold float32 values"),
    "booleans": (b'{"features":[true,false,true,false]}', b"", "input 'features' must hold float32 values"),
    "null-value": (b'{"features":null}', b"", "input 'features' must hold float32 values, got null"),
    "array": (b"[1,2]", b"", "record must be a JSON object"),
    "string": (b'"text"', b"", "record must be a JSON object"),
    "number": (b"42", b"", "record must be a JSON object"),
    "json-null": (b"null", b"", "record must be a JSON object"),
    "empty": (b"", b"", "record is not valid JSON"),
    "tombstone": (None, b"", "empty record"),
    "not-utf8": (b'\xff\xfe{"features"', b"", "record is not valid JSON"),
    "oversized-output": (
        json.dumps({"features": GOOD_FEATURES, "pad": "x" * BIG}).encode(),
        b"",
        "its output record would be",
    ),
    "oversized-error": (
        json.dumps({"features": "x" * BIG}).encode(),
        b"",
        "input 'features' must hold float32 values, got a string",
    ),
    "huge-request-id": (
        json.dumps({"features": GOOD_FEATURES}).encode(),
        b"r" * 100_000,
        "request-id header is",
    ),
    "non-utf8-request-id": (
        json.dumps({"features": GOOD_FEATURES}).encode(),
        b"\xff\xfe\xfd",
        "request-id header",
    ),
}


def rid_of(name: str) -> bytes:
    return HOSTILE[name][1] or f"bad-{name}".encode()


@pytest.fixture(scope="module")
def workspace() -> str:
    return f"hostile-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def engine(engine_settings: EngineSettings, workspace: str) -> Iterator[Engine]:
    settings = engine_settings.model_copy(
        update={"workspaces": [workspace], "instance_id": f"hostile-{secrets.token_hex(3)}"}
    )
    engine = Engine(settings)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), name="engine", daemon=True)
    thread.start()
    assert engine.ready.wait(TIMEOUT), "engine did not catch up with joey.deployments"
    yield engine
    stop.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "engine did not stop"


def send(
    settings: CommonSettings, topic: str, items: list[tuple[bytes, bytes | None]]
) -> dict[bytes, tuple[int, int]]:
    """Produce (request id, value) pairs, keyed by position, as a hostile producer allowed large records
    would; return where each request id landed."""
    positions: dict[bytes, tuple[int, int]] = {}
    producer = Producer(kafka.producer_config(settings, **{"message.max.bytes": 5_000_000}))
    for i, (rid, value) in enumerate(items):

        def delivered(err: Any, message: Message, rid: bytes = rid) -> None:
            assert err is None, err
            positions[rid] = (message.partition(), message.offset())  # type: ignore[assignment]

        producer.produce(
            topic, value, f"k-{i}".encode(), headers=[(records.REQUEST_ID_HEADER, rid)], on_delivery=delivered
        )
    assert producer.flush(30) == 0
    return positions


def wait_committed(settings: CommonSettings, workspace: str, pipeline: str, ends: dict[int, int]) -> None:
    names = topics.pipeline_topics(workspace, pipeline)
    group = Consumer(kafka.consumer_config(settings, topics.engine_group(workspace, pipeline)))
    try:

        def committed() -> bool:
            partitions = [TopicPartition(names.inputs, p) for p in range(settings.pipeline_partitions)]
            done = {
                tp.partition: tp.offset for tp in group.committed(partitions, timeout=10) if tp.offset >= 0
            }
            return done == ends

        wait_until(committed, TIMEOUT, f"committed offsets {ends}")
    finally:
        group.close()


def ends_of(positions: dict[bytes, tuple[int, int]]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for partition, offset in positions.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def read_all(reader: TopicReader, done: Callable[[list[Message]], bool], what: str) -> list[Message]:
    wait_until(lambda: reader.poll() >= 0 and done(reader.messages), TIMEOUT, what)
    return reader.drain()


def logs_of(messages: list[Message], workspace: str, pipeline: str) -> list[dict[str, Any]]:
    return [
        log for log in log_entries(messages) if (log["workspace"], log["pipeline"]) == (workspace, pipeline)
    ]


def test_hostile_records_fail_alone_and_every_good_one_is_answered_and_logged_once(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    artifact_server: tuple[Any, str],
    iris_model: Path,
) -> None:
    from train_model import make_records  # examples/, put on sys.path by the iris_model fixture

    ws, pipeline = workspace, "iris"
    names = topics.pipeline_topics(ws, pipeline)
    deploy(settings, ws, pipeline, make_spec(ws, pipeline, artifact_server[0].add(iris_model.read_bytes())))
    running: list[heartbeats.ReplicaHeartbeat] = wait_until(  # type: ignore[assignment]
        lambda: [b for b in replicas(redis_client, engine_settings, ws, pipeline) if b.loaded and b.assigned],
        TIMEOUT,
        "a running replica",
    )
    [beat] = running
    [pid] = engine.replica_pids(topics.deployment_key(ws, pipeline)).values()

    good = {f"good-{i}".encode(): json.dumps(row).encode() for i, row in enumerate(make_records(100, seed=5))}
    bad = [(rid_of(name), value) for name, (value, _, _) in HOSTILE.items()]
    items = list(good.items())
    # One hostile record after every four good ones, so each batch mixes them.
    mixed: list[tuple[bytes, bytes | None]] = []
    for i, item in enumerate(items):
        mixed.append(item)
        if i % 4 == 3 and bad:
            mixed.append(bad.pop())
    mixed += bad
    positions = send(settings, names.inputs, mixed)
    # The request id each bad record is answered under: the bounded one for a header that is unusable.
    expected_errors = {
        records.parse_request_id(rid_of(name))[0]: reason for name, (_, _, reason) in HOSTILE.items()
    }
    good_ids = {rid.decode() for rid in good}

    outputs = TopicReader(settings, names.outputs)
    errors = TopicReader(settings, names.errors)
    logs = TopicReader(settings, topics.LOGS)
    try:
        wait_committed(settings, ws, pipeline, ends_of(positions))
        answered = read_all(outputs, lambda ms: len(ms) >= len(good), "every good record answered")
        failed = read_all(errors, lambda ms: len(ms) >= len(HOSTILE), "every bad record on the errors topic")
        logged = logs_of(
            read_all(
                logs, lambda ms: len(logs_of(ms, ws, pipeline)) >= len(mixed), "a log record of every input"
            ),
            ws,
            pipeline,
        )
    finally:
        for reader in (outputs, errors, logs):
            reader.close()

    assert Counter(request_id(m) for m in answered) == Counter(good_ids)
    for message in answered:
        assert json.loads(message.value())["in"] == json.loads(good[request_id(message).encode()])  # type: ignore[arg-type, union-attr]

    reasons = {str(request_id(m)): json.loads(m.value()) for m in failed}  # type: ignore[arg-type]
    assert len(failed) == len(HOSTILE) and reasons.keys() == expected_errors.keys()
    for rid, body in reasons.items():
        assert body["error"].startswith(expected_errors[rid]), (rid[:50], body["error"][:300])
        assert body["request_id"] == rid
    for name in ("oversized-output", "oversized-error"):
        value = HOSTILE[name][0] or b""
        body = reasons[rid_of(name).decode()]
        assert "-byte limit of a record" in body["error"], body["error"]
        assert body["error"].endswith(f"raw_input holds its first 1024 of {len(value)} bytes")
        assert body["input"] is None and body["raw_input"] == value[:1024].decode()

    by_outcome = Counter((log["request_id"], log["ok"]) for log in logged)
    assert by_outcome == Counter(
        {(rid, True): 1 for rid in good_ids} | {(rid, False): 1 for rid in expected_errors}
    )
    for log in logged:
        if not log["ok"]:
            assert log["error"] == reasons[log["request_id"]]["error"]

    # The replica that started is the one that answered everything: it never restarted.
    assert engine.replica_pids(topics.deployment_key(ws, pipeline)) == {beat.replica_id: pid}
    assert [(b.replica_id, b.error) for b in replicas(redis_client, engine_settings, ws, pipeline)] == [
        (beat.replica_id, "")
    ]
    deploy(settings, ws, pipeline, None)


KILLER = """
import os, signal

def process_data(inputs):
    x = inputs["x"]
    if (x == 13).any():
        # As the OOM killer would: the replica process, this sandbox's parent, dies mid-batch.
        os.kill(os.getppid(), signal.SIGKILL)
    return {"y": x * 2}
"""


def test_a_record_that_kills_its_replica_is_dead_lettered_after_the_allowed_attempts(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    artifact_server: tuple[Any, str],
) -> None:
    ws, pipeline = workspace, "killer"
    names = topics.pipeline_topics(ws, pipeline)
    step = registry_pb2.ResolvedStep(
        model="killer",
        version=1,
        sha256=artifact_server[0].add(KILLER.encode()),
        framework="python",
        inputs=[registry_pb2.TensorSpec(name="x", dtype="float64", shape=[-1])],
        outputs=[registry_pb2.TensorSpec(name="y", dtype="float64", shape=[-1])],
    )
    deploy(settings, ws, pipeline, make_spec(ws, pipeline, steps=[step]))
    wait_until(
        lambda: [b for b in replicas(redis_client, engine_settings, ws, pipeline) if b.loaded and b.assigned],
        TIMEOUT,
        "a running replica",
    )
    values = {f"x-{x}".encode(): json.dumps({"x": x}).encode() for x in range(20)}
    positions = send(settings, names.inputs, list(values.items()))

    outputs = TopicReader(settings, names.outputs)
    errors = TopicReader(settings, names.errors)
    try:
        wait_committed(settings, ws, pipeline, ends_of(positions))
        answered = read_all(outputs, lambda ms: len(ms) >= 19, "the other records answered")
        [failed] = read_all(errors, bool, "the killer dead-lettered")
    finally:
        outputs.close()
        errors.close()
    assert Counter(request_id(m) for m in answered) == Counter(f"x-{x}" for x in range(20) if x != 13)
    assert {request_id(m): json.loads(m.value())["out"]["y"] for m in answered} == {  # type: ignore[arg-type]
        f"x-{x}": 2.0 * x for x in range(20) if x != 13
    }
    body = json.loads(failed.value())  # type: ignore[arg-type]
    assert request_id(failed) == "x-13"
    assert body["error"].startswith(
        f"dead-lettered after {engine_settings.max_record_attempts} attempts: a replica processing this "
        "record stopped"
    ), body["error"]
    assert body["raw_input"] == '{"x": 13}'
    deploy(settings, ws, pipeline, None)
