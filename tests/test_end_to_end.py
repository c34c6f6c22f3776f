"""The whole path with every service in its own process: upload -> pipeline -> deploy ->
records over Kafka -> outputs and errors -> inference log in Postgres -> undeploy."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from joey.client import Client, JoeyError
from joey_core.kafka import producer_config
from joey_core.records import REQUEST_ID_HEADER, dumps
from joey_core.settings import CommonSettings
from train_model import make_records  # examples/, put on sys.path by conftest

from .conftest import Stack, wait_until


@pytest.fixture()
def client(stack: Stack, settings: CommonSettings) -> Client:
    return Client(settings=settings)


def direct_labels(model_path: Path, records: list[dict]) -> list[int]:
    session = ort.InferenceSession(str(model_path))
    features = np.array([r["features"] for r in records], dtype=np.float32)
    return [int(v) for v in session.run(["label"], {"features": features})[0]]


def test_model_to_logged_inference(client: Client, iris_model: Path) -> None:
    model = client.upload_model("iris-e2e", iris_model)
    assert [s.name for s in model.inputs] == ["features"]
    pipeline = client.build_pipeline("e2e").add_model_step(model)
    status = pipeline.deploy(replicas=2, timeout=90)

    assert status.ready and status.status == "Running"
    live = [r for r in status.replicas if r.alive]
    assert len(live) == 2
    held = [p for r in live for p in r.partitions]
    assert sorted(held) == list(range(4)), "two replicas in one group split every partition between them"

    started = datetime.now(UTC)
    good = make_records(300, seed=1)
    bad: list = [
        b"this is not json",
        {"features": [1.0, 2.0]},
        b'{"features": [NaN, 1.0, 2.0, 3.0]}',
        {"petals": [1, 2, 3, 4]},
        {"features": ["a", "b", "c", "d"]},
    ]
    records = good[:150] + bad + good[150:]
    results = pipeline.infer(records, timeout=90)

    assert len(results) == len(records)
    ok = results[results["error"].isna()]
    failed = results[results["error"].notna()]
    assert len(ok) == len(good) and len(failed) == len(bad)
    assert [int(v) for v in ok["out.label"]] == direct_labels(iris_model, good)
    assert all(len(p) == 3 for p in ok["out.probabilities"])
    assert set(ok["metadata.pipeline_version"]) == {status.pipeline_version}
    reasons = list(failed["error"])
    assert "JSON" in reasons[0]
    assert "shape" in reasons[1]
    assert "NaN" in reasons[2]
    assert "features" in reasons[3]

    wait_until(lambda: pipeline.log_count(start=started) == len(records), 60, "every inference logged")
    assert pipeline.log_count(start=started, valid=False) == len(bad)
    logs = pipeline.logs(limit=10)
    assert len(logs) == 10 and logs["time"].is_monotonic_decreasing
    failures = pipeline.logs(limit=100, valid=False, start=started)
    assert sorted(failures["error"]) == sorted(reasons)

    pipeline.undeploy()
    wait_until(lambda: not any(r.alive for r in pipeline.status().replicas), 30, "replicas stopped")
    assert pipeline.status().status == "Undeployed"
    with pytest.raises(JoeyError) as err:
        pipeline.infer(good[:1])
    assert err.value.code == "FAILED_PRECONDITION" and "not deployed" in err.value.message


def test_bad_upload_stores_nothing(client: Client, tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"definitely not an onnx model")
    with pytest.raises(JoeyError) as err:
        client.upload_model("junk", junk)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "junk" not in [m.name for m in client.list_models()]


def test_unknown_pipeline_is_a_clear_error(client: Client) -> None:
    # Deploying a pipeline that has no steps, here or stored, says so and how to add one.
    with pytest.raises(JoeyError) as err:
        client.build_pipeline("nowhere").deploy()
    assert err.value.code == "FAILED_PRECONDITION" and "'nowhere' has no steps" in err.value.message


def test_engine_kill9_loses_nothing_and_logs_each_inference_once(
    client: Client, stack: Stack, settings: CommonSettings, iris_model: Path, database_url: str
) -> None:
    """kill -9 of the engine mid-stream: after a restart every input is answered, and logged exactly once."""
    model = client.upload_model("iris-crash", iris_model)
    pipeline = client.build_pipeline("crash").add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    topics = pipeline.topics
    total = 3000

    answered: set[str] = set()
    reader = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "crash-reader",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    reader.assign([TopicPartition(topics.outputs, p, 0) for p in range(4)])

    def read_outputs() -> int:
        for message in reader.consume(1000, timeout=0.2):
            if not message.error():
                answered.add(json.loads(message.value())["request_id"])
        return len(answered)

    producer = Producer(producer_config(settings))
    stop = threading.Event()

    def produce() -> None:
        for i, row in enumerate(make_records(total, seed=3)):
            if stop.is_set():
                return
            producer.produce(topics.inputs, dumps(row), headers=[(REQUEST_ID_HEADER, f"crash-{i}".encode())])
            producer.poll(0)
            if i % 100 == 99:
                time.sleep(0.02)
        producer.flush(30)

    feeder = threading.Thread(target=produce)
    feeder.start()
    try:
        wait_until(lambda: read_outputs() >= 300, 60, "first outputs")
        stack.engine.kill9()
        stack.engine.start()
        feeder.join(60)
        wait_until(lambda: read_outputs() == total, 120, f"all {total} inputs answered after the restart")
    finally:
        stop.set()
        feeder.join(10)
        reader.close()

    def logged() -> tuple[int, int]:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT request_id) FROM inference_logs WHERE pipeline = 'crash'"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    wait_until(lambda: logged() == (total, total), 60, "exactly one log row per inference")
    pipeline.undeploy()


def test_validation_checks_flag_anomalies_end_to_end(client: Client, iris_model: Path) -> None:
    model = client.upload_model("iris-checks", iris_model)
    pipeline = (
        client.build_pipeline("checks")
        .add_model_step(model)
        .add_validations(too_sure="out.probabilities[0] > 0.99", long_sepal="in.features[0] > 7.0")
    )
    pipeline.deploy(timeout=90)
    started = datetime.now(UTC)
    records = [
        {"features": [5.0, 3.5, 1.3, 0.3]},
        {"features": [7.7, 3.0, 6.1, 2.3]},
        {"features": [6.0, 2.9, 4.5, 1.5]},
    ]
    results = pipeline.infer(records, timeout=60)

    expected_sure = [p[0] > 0.99 for p in results["out.probabilities"]]
    assert list(results["anomaly.too_sure"]) == expected_sure
    assert list(results["anomaly.long_sepal"]) == [False, True, False]
    counts = [int(s) + int(lng) for s, lng in zip(expected_sure, [False, True, False], strict=True)]
    assert list(results["anomaly.count"]) == counts
    assert results["error"].isna().all(), "a check never turns a good inference into an error"

    flagged = sum(1 for c in counts if c)
    wait_until(lambda: pipeline.log_count(start=started) == len(records), 60, "every inference logged")
    assert pipeline.log_count(start=started, anomalies_only=True) == flagged
    anomalies = pipeline.logs(start=started, anomalies_only=True)
    assert all(len(f) > 0 for f in anomalies["check_failures"])
    pipeline.undeploy()


def test_input_mapping_feeds_a_model_from_a_differently_named_field(client: Client, iris_model: Path) -> None:
    model = client.upload_model("iris-mapped", iris_model)
    pipeline = client.build_pipeline("mapped").add_model_step(model, inputs={"features": "petals"})
    pipeline.deploy(timeout=90)
    rows = make_records(20, seed=5)
    results = pipeline.infer(
        [{"petals": r["features"]} for r in rows] + [{"features": [1, 2, 3, 4]}], timeout=60
    )
    assert [int(v) for v in results["out.label"][:20]] == direct_labels(iris_model, rows)
    assert "record field 'petals'" in results["error"].iloc[20]
    pipeline.undeploy()


def test_shadow_challenger_sees_every_input_without_changing_results(
    client: Client, iris_model: Path
) -> None:
    champion = client.upload_model("iris-champion", iris_model)
    challenger = client.upload_model("iris-challenger", iris_model)
    pipeline = client.build_pipeline("shadowed").add_shadow_deploy(champion, [challenger])
    pipeline.deploy(timeout=90)
    started = datetime.now(UTC)
    rows = make_records(30, seed=9)
    results = pipeline.infer(rows, timeout=60)

    assert [int(v) for v in results["out.label"]] == direct_labels(iris_model, rows)
    assert list(results["shadow.iris-challenger.label"]) == list(results["out.label"])
    wait_until(lambda: pipeline.log_count(start=started) == len(rows), 60, "every inference logged")
    logs = pipeline.logs(start=started, limit=100)
    assert logs["shadow.iris-challenger.label"].notna().all()
    pipeline.undeploy()
