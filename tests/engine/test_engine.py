"""The engine against the real broker and Redis, with a stand-in registry for artifacts."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families

from joey_core import heartbeats, kafka, records, topics
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2
from joey_engine import metrics
from joey_engine.service import Engine
from joey_engine.settings import EngineSettings

TIMEOUT = 30.0


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return value


class TopicReader:
    """Reads every partition of a topic from the beginning, outside any consumer group."""

    def __init__(self, settings: CommonSettings, topic: str) -> None:
        partitions = kafka.topic_partitions(kafka.admin_client(settings), [topic])[topic]
        self.consumer = Consumer(kafka.consumer_config(settings, f"test-reader-{secrets.token_hex(4)}"))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.messages: list[Message] = []

    def poll(self, timeout: float = 0.2) -> int:
        batch = [m for m in self.consumer.consume(1000, timeout) if m.error() is None]
        self.messages += batch
        return len(batch)

    def read_until(self, done: Callable[[list[Message]], bool], what: str) -> list[Message]:
        deadline = time.monotonic() + TIMEOUT
        while not done(self.messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; have {len(self.messages)} records")
            self.poll()
        return self.messages

    def drain(self) -> list[Message]:
        """Whatever else arrives until the topic has been quiet for a moment."""
        while self.poll(1.0):
            pass
        return self.messages

    def close(self) -> None:
        self.consumer.close()


def request_id(message: Message) -> str | None:
    return records.header_value(message.headers(), records.REQUEST_ID_HEADER)  # type: ignore[arg-type]


def log_entries(messages: list[Message]) -> list[dict[str, Any]]:
    """The log entries the ``joey.logs`` records ``messages`` carry (a batch's in one record), in order."""
    return [entry for m in messages for entry in records.decode_log_entries(m.headers(), m.value())]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(engine_settings: EngineSettings, settings: CommonSettings) -> Iterator[Engine]:
    engine = Engine(engine_settings)
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            engine.run(stop)
        except BaseException as exc:
            failures.append(exc)
            raise

    thread = threading.Thread(target=run, name="engine", daemon=True)
    thread.start()
    assert engine.ready.wait(TIMEOUT), "engine did not catch up with joey.deployments"
    yield engine
    stop.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "engine did not stop"
    assert not failures


@pytest.fixture(scope="module")
def iris_sha(artifact_server: tuple[Any, str], iris_model: Path) -> str:
    return str(artifact_server[0].add(iris_model.read_bytes()))


def deploy(settings: CommonSettings, workspace: str, pipeline: str, spec: Any | None) -> None:
    """Publish a spec (or a tombstone) as the registry does, creating the pipeline's topics first."""
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, workspace, pipeline)
    )
    producer = Producer(kafka.producer_config(settings))
    value = json_format.MessageToJson(spec).encode() if spec is not None else None
    producer.produce(topics.DEPLOYMENTS, value, topics.deployment_key(workspace, pipeline).encode())
    assert producer.flush(10) == 0


def produce(
    settings: CommonSettings,
    topic: str,
    values: list[tuple[str, bytes]],
    extra_headers: dict[str, list[tuple[str, bytes]]] | None = None,
) -> dict[str, tuple[int, int]]:
    """Produce (request id, value) pairs keyed by request id, with ``extra_headers`` by request id; return
    where each request id landed."""
    positions: dict[str, tuple[int, int]] = {}

    def delivered(rid: str, err: Any, message: Message) -> None:
        assert err is None, err
        positions[rid] = (message.partition(), message.offset())  # type: ignore[assignment]

    producer = Producer(kafka.producer_config(settings))
    for rid, value in values:
        headers: list[tuple[str, str | bytes | None]] = [
            (records.REQUEST_ID_HEADER, rid.encode()),
            *(extra_headers or {}).get(rid, []),
        ]
        producer.produce(
            topic, value, rid.encode(), headers=headers, on_delivery=functools.partial(delivered, rid)
        )
    assert producer.flush(10) == 0
    return positions


def replicas(
    client: redis.Redis, settings: EngineSettings, workspace: str, pipeline: str
) -> list[heartbeats.ReplicaHeartbeat]:
    return [v.beat for v in heartbeats.read(client, settings.redis_prefix, workspace, pipeline) if v.alive]


def labels(model: Path, rows: list[dict[str, Any]]) -> list[int]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    features = np.asarray([row["features"] for row in rows], np.float32)
    return [int(v) for v in session.run(["label"], {"features": features})[0]]


BAD = {
    "bad-text": (b"not json", "record is not valid JSON"),
    "bad-array": (b"[1, 2, 3]", "record must be a JSON object mapping input names to values, got list"),
    "bad-missing": (
        b'{"petals": [1, 2, 3, 4]}',
        "missing input 'features'; the pipeline expects inputs 'features' (float32 [4]); "
        "the record has fields 'petals'",
    ),
    "bad-shape": (b'{"features": [1, 2, 3]}', "input 'features' has shape [3], expected [4]"),
    "bad-type": (
        b'{"features": "wide"}',
        "input 'features' must hold float32 values, got a string (\"wide\")",
    ),
    "bad-nan": (b'{"features": [NaN, 1, 2, 3]}', "input 'features' contains NaN/inf at element [0] (nan)"),
    "bad-inf": (
        b'{"features": [1, 2, Infinity, 3]}',
        "input 'features' contains NaN/inf at element [2] (inf)",
    ),
}


def test_engine_announces_itself(
    engine: Engine, redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    wait_for(
        lambda: (
            engine_settings.instance_id
            in heartbeats.live_services(redis_client, engine_settings.redis_prefix, "engine")
        ),
        "engine service heartbeat",
    )


def test_serves_outputs_errors_and_logs(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    engine_workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_sha: str,
    iris_model: Path,
) -> None:
    from train_model import make_records  # examples/, put on sys.path by the iris_model fixture

    ws, pipeline = engine_workspace, "iris"
    names = topics.pipeline_topics(ws, pipeline)
    spec = make_spec(ws, pipeline, iris_sha)
    deploy(settings, ws, pipeline, spec)

    rows = make_records(300, seed=1)
    for i, row in enumerate(rows):
        row["customer"] = f"c{i}"  # not a model input: must come back untouched
    good = [(f"req-{i}", json.dumps(row).encode()) for i, row in enumerate(rows)]
    bad = [(rid, value) for rid, (value, _) in BAD.items()]
    # Bad records in the middle: the records after them must still be served.
    positions = produce(settings, names.inputs, good[:150] + bad + good[150:])
    ends: dict[int, int] = {}
    for partition, offset in positions.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    expected_labels = dict(zip((rid for rid, _ in good), labels(iris_model, rows), strict=True))

    outputs = TopicReader(settings, names.outputs)
    errors = TopicReader(settings, names.errors)
    logs = TopicReader(settings, topics.LOGS)
    try:
        outputs.read_until(lambda ms: {request_id(m) for m in ms} >= expected_labels.keys(), "all outputs")
        errors.read_until(lambda ms: len(ms) >= len(BAD), "all errors")

        committed_group = Consumer(kafka.consumer_config(settings, topics.engine_group(ws, pipeline)))
        try:
            wait_for(
                lambda: (
                    {
                        tp.partition: tp.offset
                        for tp in committed_group.committed(
                            [TopicPartition(names.inputs, p) for p in range(settings.pipeline_partitions)],
                            timeout=10,
                        )
                        if tp.offset >= 0
                    }
                    == ends
                ),
                f"committed offsets {ends}",
            )
        finally:
            committed_group.close()

        # Exactly once: nothing more arrives once every offset is committed.
        out_messages = outputs.drain()
        by_id = Counter(request_id(m) for m in out_messages)
        assert set(by_id) == set(expected_labels) and set(by_id.values()) == {1}
        for message in out_messages:
            rid = request_id(message)
            assert message.key() == rid.encode()  # type: ignore[union-attr]
            value = json.loads(message.value())  # type: ignore[arg-type]
            assert value["request_id"] == rid
            assert value["out"]["label"] == expected_labels[rid]  # type: ignore[index]
            assert len(value["out"]["probabilities"]) == 3
            assert value["in"] == rows[int(rid.removeprefix("req-"))]  # type: ignore[union-attr]
            assert value["check_failures"] == []
            meta = value["metadata"]
            assert meta["deployment_id"] == spec.deployment_id and meta["pipeline_version"] == 1
            assert meta["models"] == [{"name": "iris", "version": 1, "sha256": iris_sha}]
            assert (meta["partition"], meta["offset"]) == positions[rid]  # type: ignore[index]
            assert len(meta["elapsed_ns"]) == 1 and meta["elapsed_ns"][0] > 0
            assert value["time"].endswith("+00:00")

        error_messages = errors.drain()
        assert sorted(request_id(m) for m in error_messages) == sorted(BAD)  # type: ignore[type-var]
        for message in error_messages:
            rid = request_id(message)
            raw, reason = BAD[rid]  # type: ignore[index]
            value = json.loads(message.value())  # type: ignore[arg-type]
            assert value["error"].startswith(reason), value["error"]
            assert value["request_id"] == rid and value["metadata"]["deployment_id"] == spec.deployment_id
            assert (value["metadata"]["partition"], value["metadata"]["offset"]) == positions[rid]  # type: ignore[index]
            if rid in ("bad-text", "bad-array"):
                assert value["input"] is None and value["raw_input"] == raw.decode()
                continue
            assert value["raw_input"] is None
            if rid in ("bad-nan", "bad-inf"):
                assert None in value["input"]["features"]  # JSON has no NaN/inf: they come back as null
            else:
                assert value["input"] == json.loads(raw)

        def ours(ms: list[Message]) -> list[dict[str, Any]]:
            found = []
            for m in ms:
                batch = log_entries([m])
                first = batch[0]["request_id"]
                found += [
                    log | {"_key": m.key(), "_first": first, "_headers": m.headers()}
                    for log in batch
                    if (log["workspace"], log["pipeline"]) == (ws, pipeline)
                ]
            return found

        logs.read_until(lambda ms: len(ours(ms)) >= len(good) + len(bad), "all logs")
        entries = ours(logs.drain())
        assert Counter(e["request_id"] for e in entries) == Counter(rid for rid, _ in good + bad)
        for entry in entries:
            # A log record holds the entries of a batch, keyed by the first one's request id.
            assert entry["_key"] == entry["_first"].encode()
            assert (records.CONTENT_TYPE_HEADER, records.LOG_BATCH_CONTENT_TYPE.encode()) in entry["_headers"]
            assert entry["deployment_id"] == spec.deployment_id and entry["input_topic"] == names.inputs
            if entry["request_id"] in BAD:
                assert not entry["ok"] and entry["error"].startswith(BAD[entry["request_id"]][1])
                assert entry["outputs"] is None and entry["elapsed_ns"] == []
            else:
                assert entry["ok"] and entry["error"] is None
                assert json.loads(entry["outputs"])["label"] == expected_labels[entry["request_id"]]
                assert json.loads(entry["inputs"])["customer"].startswith("c")
        raw_logs = {e["request_id"]: e for e in entries if e["inputs"] is None}
        assert set(raw_logs) == {"bad-text", "bad-array"}
        assert raw_logs["bad-text"]["raw_input"] == b"not json"
    finally:
        for reader in (outputs, errors, logs):
            reader.close()

    [beat] = wait_for(lambda: replicas(redis_client, engine_settings, ws, pipeline), "replica heartbeat")
    assert beat.loaded and beat.error == "" and beat.deployment_id == spec.deployment_id
    assert beat.partitions == list(range(settings.pipeline_partitions))


def test_records_past_their_deadline_fail_in_place_while_the_rest_are_served(
    engine: Engine,
    settings: CommonSettings,
    engine_workspace: str,
    make_spec: Callable[..., Any],
    iris_sha: str,
    iris_model: Path,
) -> None:
    """Every other record's deadline has passed: those are reported as errors, unprocessed, and the ones
    between them, in the same batches, are answered with their own outputs."""
    from train_model import make_records  # examples/, put on sys.path by the iris_model fixture

    ws, pipeline = engine_workspace, "iris-deadlines"
    names = topics.pipeline_topics(ws, pipeline)
    deploy(settings, ws, pipeline, make_spec(ws, pipeline, iris_sha))
    rows = make_records(40, seed=3)
    values = [(f"dl-{i}", json.dumps(row).encode()) for i, row in enumerate(rows)]
    expired = {rid for rid, _ in values[::2]}
    later = str(time.time() * 1000 + 600_000).encode()
    deadlines = {rid: [(records.DEADLINE_HEADER, b"1" if rid in expired else later)] for rid, _ in values}
    positions = produce(settings, names.inputs, values, deadlines)
    expected_labels = dict(zip((rid for rid, _ in values), labels(iris_model, rows), strict=True))

    outputs = TopicReader(settings, names.outputs)
    errors = TopicReader(settings, names.errors)
    try:
        answered = outputs.read_until(lambda ms: len(ms) >= len(values) - len(expired), "all outputs")
        failed = errors.read_until(lambda ms: len(ms) >= len(expired), "all errors")
        by_id = {request_id(m): json.loads(m.value()) for m in answered}  # type: ignore[arg-type]
        assert by_id.keys() == expected_labels.keys() - expired
        for rid, body in by_id.items():
            assert body["out"]["label"] == expected_labels[rid]  # type: ignore[index]
            assert body["in"] == rows[int(rid.removeprefix("dl-"))]  # type: ignore[union-attr]
        reported = {request_id(m): json.loads(m.value()) for m in failed}  # type: ignore[arg-type]
        assert reported.keys() == expired
        for rid, body in reported.items():
            assert body["error"].startswith(records.DEADLINE_EXCEEDED), body["error"]
            assert body["input"] is None and body["raw_input"] == dict(values)[rid].decode()  # type: ignore[index]
            assert (body["metadata"]["partition"], body["metadata"]["offset"]) == positions[rid]  # type: ignore[index]
    finally:
        outputs.close()
        errors.close()
    deploy(settings, ws, pipeline, None)


def test_checks_flag_anomalies_in_outputs_and_logs(
    engine: Engine,
    settings: CommonSettings,
    engine_workspace: str,
    make_spec: Callable[..., Any],
    make_step: Callable[..., Any],
    make_validations: Callable[..., Any],
    iris_sha: str,
    iris_model: Path,
) -> None:
    ws, pipeline = engine_workspace, "iris-checked"
    names = topics.pipeline_topics(ws, pipeline)
    checks = {"too_sure": "out.probabilities[0] > 0.99", "risky": "in.score > 0.5"}
    spec = make_spec(ws, pipeline, steps=[make_step(iris_sha), make_validations(**checks)])
    deploy(settings, ws, pipeline, spec)
    rows: list[dict[str, Any]] = [
        {"features": [5.1, 3.5, 1.4, 0.2], "score": 0.1},
        {"features": [6.7, 3.0, 5.2, 2.3], "score": 0.9},
        {"features": [5.9, 2.8, 4.3, 1.3]},  # no score: "risky" counts as failed, the record is answered
    ]
    session = ort.InferenceSession(str(iris_model), providers=["CPUExecutionProvider"])
    features = np.asarray([row["features"] for row in rows], np.float32)
    setosa = session.run(["probabilities"], {"features": features})[0][:, 0]
    expected = {
        f"chk-{i}": [
            name
            for name, hit in (("risky", "score" not in row or row["score"] > 0.5), ("too_sure", p > 0.99))
            if hit
        ]
        for i, (row, p) in enumerate(zip(rows, setosa, strict=True))
    }
    assert expected["chk-0"] == ["too_sure"]  # the model is sure of the first row
    produce(settings, names.inputs, [(f"chk-{i}", json.dumps(row).encode()) for i, row in enumerate(rows)])
    outputs = TopicReader(settings, names.outputs)
    logs = TopicReader(settings, topics.LOGS)
    try:
        answered = outputs.read_until(lambda ms: len(ms) >= len(rows), "all outputs")
        by_id = {request_id(m): json.loads(m.value()) for m in answered}  # type: ignore[arg-type]
        assert by_id.keys() == expected.keys()
        for rid, failures in expected.items():
            body = by_id[rid]
            assert body["check_failures"] == failures
            assert body["anomaly"] == {"count": len(failures)} | {
                name: name in failures for name in sorted(checks)
            }
            assert len(body["metadata"]["elapsed_ns"]) == 2
        entries = logs.read_until(
            lambda ms: sum(log["pipeline"] == pipeline for log in log_entries(ms)) >= len(rows),
            "all logs",
        )
        logged = {
            log["request_id"]: log["check_failures"]
            for log in log_entries(entries)
            if (log["workspace"], log["pipeline"]) == (ws, pipeline)
        }
        assert logged == expected
    finally:
        outputs.close()
        logs.close()
    deploy(settings, ws, pipeline, None)


def test_shadow_step_serves_the_champion_and_logs_the_challenger(
    engine: Engine,
    settings: CommonSettings,
    engine_workspace: str,
    artifact_server: tuple[Any, str],
    make_spec: Callable[..., Any],
    make_step: Callable[..., Any],
    make_challenger: Callable[..., Any],
    iris_sha: str,
    iris_model: Path,
    sum_model: Path,
) -> None:
    ws, pipeline = engine_workspace, "iris-shadow"
    names = topics.pipeline_topics(ws, pipeline)
    sum_sha = artifact_server[0].add(sum_model.read_bytes())
    spec = make_spec(ws, pipeline, steps=[make_step(iris_sha, challengers=[make_challenger("sum", sum_sha)])])
    deploy(settings, ws, pipeline, spec)
    rows = [{"features": [5.1, 3.5, 1.4, 0.2]}, {"features": [6.7, 3.0, 5.2, 2.3]}]
    expected = {f"shd-{i}": row for i, row in enumerate(rows)}
    produce(settings, names.inputs, [(rid, json.dumps(row).encode()) for rid, row in expected.items()])
    outputs = TopicReader(settings, names.outputs)
    logs = TopicReader(settings, topics.LOGS)
    try:
        answered = outputs.read_until(lambda ms: len(ms) >= len(rows), "all outputs")
        by_id = {request_id(m): json.loads(m.value()) for m in answered}  # type: ignore[arg-type]
        assert by_id.keys() == expected.keys()
        assert [by_id[rid]["out"]["label"] for rid in expected] == labels(iris_model, rows)
        for rid, row in expected.items():
            assert by_id[rid]["shadow"] == {"sum": {"total": pytest.approx(sum(row["features"]))}}
            assert "shadow_errors" not in by_id[rid]
            assert [m["name"] for m in by_id[rid]["metadata"]["models"]] == ["iris"]
        entries = logs.read_until(
            lambda ms: sum(log["pipeline"] == pipeline for log in log_entries(ms)) >= len(rows),
            "all logs",
        )
        logged = {
            log["request_id"]: json.loads(log["shadow_outputs"])
            for log in log_entries(entries)
            if (log["workspace"], log["pipeline"]) == (ws, pipeline)
        }
        assert logged == {rid: by_id[rid]["shadow"] for rid in expected}
    finally:
        outputs.close()
        logs.close()
    deploy(settings, ws, pipeline, None)


def test_replicas_split_partitions_then_redeploy_and_undeploy(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    engine_workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_sha: str,
) -> None:
    ws, pipeline = engine_workspace, "iris-replicas"
    names = topics.pipeline_topics(ws, pipeline)
    all_partitions = set(range(settings.pipeline_partitions))
    first = make_spec(ws, pipeline, iris_sha, replicas=2)
    deploy(settings, ws, pipeline, first)

    def split_in_two() -> bool:
        beats = replicas(redis_client, engine_settings, ws, pipeline)
        held = [set(b.partitions) for b in beats if b.loaded and b.deployment_id == first.deployment_id]
        return (
            len(beats) == 2
            and len(held) == 2
            and not held[0] & held[1]
            and held[0] | held[1] == all_partitions
        )

    wait_for(split_in_two, "two replicas sharing the partitions")

    outputs = TopicReader(settings, names.outputs)
    try:
        sent = produce(
            settings, names.inputs, [(f"a-{i}", b'{"features": [5, 3, 1.5, 0.2]}') for i in range(40)]
        )
        outputs.read_until(lambda ms: {request_id(m) for m in ms} >= sent.keys(), "outputs of two replicas")

        second = make_spec(ws, pipeline, iris_sha, replicas=1, version=2)
        deploy(settings, ws, pipeline, second)

        def replaced() -> bool:
            beats = replicas(redis_client, engine_settings, ws, pipeline)
            return [(b.deployment_id, b.pipeline_version, b.loaded, set(b.partitions)) for b in beats] == [
                (second.deployment_id, 2, True, all_partitions)
            ]

        wait_for(replaced, "the new deployment replacing the old one")
        sent = produce(settings, names.inputs, [(f"b-{i}", b'{"features": [6, 3, 5, 2]}') for i in range(20)])
        outputs.read_until(lambda ms: {request_id(m) for m in ms} >= sent.keys(), "outputs after redeploy")
        versions = {
            json.loads(m.value())["metadata"]["deployment_id"]  # type: ignore[arg-type]
            for m in outputs.messages
            if request_id(m) in sent  # type: ignore[operator]
        }
        assert versions == {second.deployment_id}
    finally:
        outputs.close()

    deploy(settings, ws, pipeline, None)
    wait_for(
        lambda: not heartbeats.read(redis_client, engine_settings.redis_prefix, ws, pipeline),
        "replica heartbeats retired",
    )
    # A replica retires its heartbeat before its process ends; the engine releases the slot after that.
    wait_for(
        lambda: redis_client.keys(f"{engine_settings.redis_prefix}:slot:{ws}/{pipeline}:*") == [],
        "replica slots released",
    )


def test_unloadable_deployment_reports_and_retries_while_others_serve(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    engine_workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    artifact_server: tuple[Any, str],
    max_model: Path,
) -> None:
    ws, pipeline = engine_workspace, "max-late"
    names = topics.pipeline_topics(ws, pipeline)
    data = max_model.read_bytes()
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    step = registry_pb2.ResolvedStep(model="max", version=1, sha256=sha, framework="onnx")
    spec = make_spec(ws, pipeline, steps=[step])
    deploy(settings, ws, pipeline, spec)

    # The engine reports the slot as starting (fetching models) first, then why it cannot load.
    [beat] = wait_for(
        lambda: [b for b in replicas(redis_client, engine_settings, ws, pipeline) if b.error],
        "an error heartbeat",
    )
    assert not beat.loaded and beat.deployment_id == spec.deployment_id
    assert "NOT_FOUND" in beat.error and sha in beat.error

    # The pipeline of the first test is still served meanwhile.
    served = TopicReader(settings, topics.pipeline_topics(ws, "iris").outputs)
    try:
        produce(
            settings,
            topics.pipeline_topics(ws, "iris").inputs,
            [("still-here", b'{"features": [5, 3, 1, 0]}')],
        )
        served.read_until(
            lambda ms: "still-here" in {request_id(m) for m in ms}, "the other pipeline serving"
        )
    finally:
        served.close()

    artifact_server[0].add(data)
    wait_for(
        lambda: (
            [(b.loaded, b.error) for b in replicas(redis_client, engine_settings, ws, pipeline)]
            == [(True, "")]
        ),
        "the deployment loaded on retry",
    )
    outputs = TopicReader(settings, names.outputs)
    try:
        produce(settings, names.inputs, [("m-1", b'{"probabilities": [0.1, 0.7, 0.2]}')])
        [message] = outputs.read_until(bool, "an output")
        assert json.loads(message.value())["out"] == {"max_probability": pytest.approx(0.7)}  # type: ignore[arg-type]
    finally:
        outputs.close()
    deploy(settings, ws, pipeline, None)


def test_hostile_deployment_records_are_ignored_and_the_good_one_serves(
    engine: Engine, settings: CommonSettings, engine_workspace: str, make_spec: Callable[..., Any]
) -> None:
    ws = engine_workspace
    key = topics.deployment_key(ws, "iris")
    good = engine._desired[key]
    assert good is not None
    override = make_spec(ws, "iris")
    override.topics.inputs = "joey.other-ws.victim.inputs"
    path_like = make_spec(ws, "iris")
    path_like.steps[0].model = "../../etc/passwd"
    bad_sha = make_spec(ws, "iris", sha256="../" * 30)
    hostile = [
        b"{not json",
        b'{"workspace": 7, "pipeline": ["iris"]}',
        b'{"workspace": "%s", "pipeline": "iris", "replicas": 1000000000000}' % ws.encode(),
        b"[" * 100_000,
        json_format.MessageToJson(override).encode(),
        json_format.MessageToJson(path_like).encode(),
        json_format.MessageToJson(bad_sha).encode(),
    ]
    rejected = metrics.REJECTED_DEPLOYMENTS._value.get()
    producer = Producer(kafka.producer_config(settings))
    for value in hostile:
        producer.produce(topics.DEPLOYMENTS, value, key.encode())
    assert producer.flush(10) == 0
    wait_for(lambda: metrics.REJECTED_DEPLOYMENTS._value.get() >= rejected + len(hostile), "records rejected")
    assert engine._desired[key] is good
    served = TopicReader(settings, topics.pipeline_topics(ws, "iris").outputs)
    try:
        produce(
            settings,
            topics.pipeline_topics(ws, "iris").inputs,
            [("after-hostile", b'{"features": [5, 3, 1, 0]}')],
        )
        served.read_until(lambda ms: "after-hostile" in {request_id(m) for m in ms}, "iris still serving")
    finally:
        served.close()


def test_crashed_replica_is_reported_and_restarted(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    engine_workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_sha: str,
) -> None:
    ws, pipeline = engine_workspace, "crashing"
    key = topics.deployment_key(ws, pipeline)
    names = topics.pipeline_topics(ws, pipeline)
    deploy(settings, ws, pipeline, make_spec(ws, pipeline, iris_sha))
    [beat] = wait_for(
        lambda: [b for b in replicas(redis_client, engine_settings, ws, pipeline) if b.loaded], "a replica"
    )
    [pid] = engine.replica_pids(key).values()
    others = engine.replica_pids(topics.deployment_key(ws, "iris"))

    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: (
            [(b.loaded, b.error) for b in replicas(redis_client, engine_settings, ws, pipeline)]
            == [(False, "replica process killed by SIGKILL")]
        ),
        "the crash reported",
    )
    wait_for(
        lambda: (
            [(b.loaded, b.error) for b in replicas(redis_client, engine_settings, ws, pipeline)]
            == [(True, "")]
        ),
        "the replica restarted",
    )
    assert list(engine.replica_pids(key)) == [beat.replica_id]
    assert engine.replica_pids(key)[beat.replica_id] != pid
    assert engine.replica_pids(topics.deployment_key(ws, "iris")) == others

    outputs = TopicReader(settings, names.outputs)
    try:
        produce(settings, names.inputs, [("after-crash", b'{"features": [5, 3, 1, 0]}')])
        outputs.read_until(
            lambda ms: "after-crash" in {request_id(m) for m in ms}, "an output after the crash"
        )
    finally:
        outputs.close()
    deploy(settings, ws, pipeline, None)


@pytest.mark.parametrize(
    ("pipeline", "error"),
    [
        ("junk-model", ""),
        ("bad-check", "step 2 (validations): check 'shaky' is invalid: "),
    ],
)
def test_model_that_fails_to_load_in_the_replica_is_reported(
    engine: Engine,
    settings: CommonSettings,
    engine_settings: EngineSettings,
    engine_workspace: str,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    make_step: Callable[..., Any],
    make_validations: Callable[..., Any],
    artifact_server: tuple[Any, str],
    iris_sha: str,
    pipeline: str,
    error: str,
) -> None:
    ws = engine_workspace
    if pipeline == "junk-model":
        spec = make_spec(ws, pipeline, artifact_server[0].add(b"not an onnx model"))
    else:
        spec = make_spec(
            ws, pipeline, steps=[make_step(iris_sha), make_validations(shaky="out.probabilities[0] >")]
        )
    deploy(settings, ws, pipeline, spec)
    [beat] = wait_for(
        lambda: [b for b in replicas(redis_client, engine_settings, ws, pipeline) if b.error],
        "a load error",
    )
    assert not beat.loaded and beat.error.startswith(f"cannot load {ws}/{pipeline} v1"), beat.error
    assert error in beat.error
    deploy(settings, ws, pipeline, None)
    wait_for(
        lambda: not heartbeats.read(redis_client, engine_settings.redis_prefix, ws, pipeline),
        "the error heartbeat retired",
    )


def live_children(pid: int) -> dict[int, str]:
    """Command lines of the live (not zombie) child processes of ``pid``, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_state(int(entry.name)) not in (None, "Z"):
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            if ppid == pid:
                found[int(entry.name)] = cmdline
    return found


def process_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), None when it is gone."""
    try:
        # The command name in parentheses may hold spaces; the state is the first field after it.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_replicas_exit_when_the_engine_is_killed(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    service_factory: Callable[..., Any],
    artifact_server: tuple[Any, str],
    iris_sha: str,
) -> None:
    ws, pipeline = f"orphans-{secrets.token_hex(3)}", "iris"
    # Redis keys of its own: this engine must not count towards the fair share of the in-process one.
    prefix = f"{engine_settings.redis_prefix}:orphans"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    service = service_factory(
        "engine",
        JOEY_INSTANCE_ID=f"orphans-{secrets.token_hex(3)}",
        JOEY_WORKSPACES=json.dumps([ws]),
        JOEY_REGISTRY_ADDR=artifact_server[1],
        JOEY_REDIS_PREFIX=prefix,
        JOEY_METRICS_PORT=str(metrics_port),
    )
    deploy(settings, ws, pipeline, make_spec(ws, pipeline, iris_sha, replicas=2))
    wait_for(
        lambda: (
            len([v for v in heartbeats.read(redis_client, prefix, ws, pipeline) if v.alive and v.beat.loaded])
            == 2
        ),
        "two replicas",
    )
    children = live_children(service.process.pid)
    assert len([c for c in children.values() if "spawn_main" in c]) == 2, children
    # The engine's endpoint serves the metrics of its replica processes.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, s.labels.get("workspace")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("joey_engine_replicas", ws)] == 2, text

    service.kill9()
    try:
        wait_for(
            lambda: all(process_state(pid) in (None, "Z") for pid in children),
            "every child of the killed engine to exit",
            timeout=15,
        )
    finally:
        for pid in children:
            if process_state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        deploy(settings, ws, pipeline, None)
