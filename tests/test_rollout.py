"""Rollouts, rollback and autoscaling through the whole stack, with records flowing all along."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from joey.client import Autoscale, Client, JoeyError, Pipeline
from joey_core.kafka import producer_config
from joey_core.records import REQUEST_ID_HEADER, dumps
from joey_core.settings import CommonSettings
from train_model import make_records, train_and_export  # examples/, put on sys.path by conftest

from .conftest import Stack, wait_until

PARTITIONS = 4  # JOEY_PIPELINE_PARTITIONS of the test stack


@pytest.fixture()
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


@dataclass
class Feed:
    """Writes records to a pipeline at a steady rate and collects every answer by request id."""

    settings: CommonSettings
    pipeline: Pipeline
    prefix: str
    rate: float = 300.0
    sent: list[tuple[str, float]] = field(default_factory=list)
    """(request id, time it was produced)."""
    answers: dict[str, list[dict]] = field(default_factory=dict)
    errors: dict[str, dict] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        topics = self.pipeline.topics
        self._reader = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": f"{self.prefix}-reader",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        self._reader.assign(
            [TopicPartition(t, p, 0) for t in (topics.outputs, topics.errors) for p in range(PARTITIONS)]
        )
        self._errors_topic = topics.errors
        self._thread = threading.Thread(target=self._produce)

    def start(self) -> Feed:
        self._thread.start()
        return self

    def _produce(self) -> None:
        producer = Producer(producer_config(self.settings))
        rows = make_records(100, seed=11)
        i = 0
        while not self._stop.is_set():
            request_id = f"{self.prefix}-{i}"
            producer.produce(
                self.pipeline.topics.inputs,
                dumps(rows[i % len(rows)]),
                headers=[(REQUEST_ID_HEADER, request_id.encode())],
            )
            self.sent.append((request_id, time.monotonic()))
            producer.poll(0)
            i += 1
            time.sleep(1 / self.rate)
        assert producer.flush(30) == 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def read(self) -> int:
        for message in self._reader.consume(2000, timeout=0.2):
            if message.error():
                continue
            value = json.loads(message.value())
            if message.topic() == self._errors_topic:
                self.errors[value["request_id"]] = value
            else:
                self.answers.setdefault(value["request_id"], []).append(value)
        return len(self.answers) + len(self.errors)

    def wait_all_answered(self) -> None:
        wait_until(lambda: self.read() >= len(self.sent), 120, f"all {len(self.sent)} records answered")
        self._reader.close()

    def sent_between(self, start: float, end: float) -> list[str]:
        return [rid for rid, at in self.sent if start <= at < end]

    def wait_sent_since(self, start: float, what: str, count: int = 100) -> None:
        """Until ``count`` records were produced since ``start`` (a third of a second at the feed's rate)."""
        wait_until(lambda: len(self.sent_between(start, float("inf"))) >= count, 30, what)


def test_rollout_and_rollback_keep_serving_every_record_with_one_version_each(
    client: Client, iris_model: Path, settings: CommonSettings, database_url: str
) -> None:
    model = client.upload_model("iris-rollout", iris_model)
    pipeline = client.build_pipeline("rollout").add_model_step(model)
    v1 = pipeline.deploy(replicas=2, timeout=90).pipeline_version
    feed = Feed(settings, pipeline, "roll").start()
    try:
        wait_until(lambda: feed.read() >= 200, 60, "v1 answering")
        # v2 adds a check, so an answer of v2 is recognisable by its steps, not only by its metadata.
        pipeline.add_validations(too_sure="out.probabilities[0] > 0.99")
        before_v2 = time.monotonic()
        v2_status = pipeline.deploy(replicas=2, timeout=120)
        v2_ready = time.monotonic()
        v2 = v2_status.pipeline_version
        assert v2 != v1 and v2_status.ready
        assert {r.pipeline_version for r in v2_status.replicas if r.alive} == {v2}
        feed.wait_sent_since(v2_ready, "v2 alone taking records a while")
        rolling_back = time.monotonic()
        back = pipeline.rollback()
        rolled_back = time.monotonic()
        assert back.pipeline_version == v1 and back.ready
        feed.wait_sent_since(rolled_back, "v1 alone taking records again")
    finally:
        feed.stop()
    feed.wait_all_answered()

    sent = [rid for rid, _ in feed.sent]
    assert not feed.errors, f"records failed during the rollout: {list(feed.errors.values())[:3]}"
    assert set(feed.answers) == set(sent), "every record produced during the rollouts is answered"
    for request_id, answers in feed.answers.items():
        for answer in answers:
            version = answer["metadata"]["pipeline_version"]
            assert version in (v1, v2)
            # Every step of the answer came from the version it names.
            assert ("anomaly" in answer) == (version == v2), (request_id, answer)
    first_version = {rid: answers[0]["metadata"]["pipeline_version"] for rid, answers in feed.answers.items()}
    during_v2 = feed.sent_between(v2_ready, rolling_back)
    after_rollback = feed.sent_between(rolled_back, float("inf"))
    assert during_v2 and after_rollback
    assert {first_version[rid] for rid in during_v2} == {v2}, "once ready, only v2 answers"
    assert {first_version[rid] for rid in after_rollback} == {v1}, "after the rollback, only v1 answers"
    assert {first_version[rid] for rid in feed.sent_between(0, before_v2)} == {v1}

    def logged() -> tuple[int, int]:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT request_id) FROM inference_logs "
                "WHERE pipeline = 'rollout' AND request_id LIKE 'roll-%'"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    wait_until(lambda: logged() == (len(sent), len(sent)), 60, "exactly one log row per record")
    with psycopg.connect(database_url) as conn:
        mixed = conn.execute(
            "SELECT count(*) FROM inference_logs WHERE pipeline = 'rollout' "
            "AND (pipeline_version = %s) <> (jsonb_array_length(elapsed_ns) = 2)",
            (v2,),
        ).fetchone()
    assert mixed == (0,), "log rows name the version whose steps (one time per step) produced them"

    # Rolling back again goes to the version deployed before the current one: v2. Which version a rollback
    # picks is the registry's answer; serving through a rollout was proven above, so these are not awaited
    # (the engine replaces the unfinished one, and the undeploy stops both).
    assert pipeline.rollback(wait=False).pipeline_version == v2
    assert pipeline.rollback(version=v1, wait=False).pipeline_version == v1
    with pytest.raises(JoeyError, match="already runs version"):
        pipeline.rollback(version=v1)
    pipeline.undeploy()
    with pytest.raises(JoeyError, match="not deployed"):
        pipeline.rollback()


def test_autoscaling_follows_queue_age_up_and_back_down(
    client: Client, iris_model: Path, settings: CommonSettings
) -> None:
    model = client.upload_model("iris-autoscale", iris_model)
    pipeline = client.build_pipeline("autoscaled").add_model_step(model)
    scaling = Autoscale(
        min_replicas=1,
        max_replicas=3,
        queue_age_threshold_s=0.5,
        scale_up_after_s=1.0,
        scale_down_after_s=3.0,
    )
    status = pipeline.deploy(autoscale=scaling, cpus="0.5", memory="512Mi", timeout=90)
    assert status.replicas_wanted == 1 and status.autoscale == scaling

    # A backlog far larger than one replica drains in the scale-up period: records wait, age grows.
    total = 150_000
    producer = Producer(
        producer_config(settings, **{"linger.ms": 20, "queue.buffering.max.messages": 2 * total})
    )
    rows = [dumps(r) for r in make_records(100, seed=12)]
    for i in range(total):
        producer.produce(
            pipeline.topics.inputs, rows[i % 100], headers=[(REQUEST_ID_HEADER, f"as-{i}".encode())]
        )
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0

    peak = wait_until(
        lambda: (s := pipeline.status()).replicas_wanted > 1 and s,
        90,
        "the autoscaler adding a replica while records queue",
    )
    assert peak.replicas_wanted <= scaling.max_replicas
    assert max(r.queue_age_s for r in peak.replicas) > scaling.queue_age_threshold_s
    wait_until(lambda: pipeline.log_count() >= total, 180, "the backlog drained and logged")
    settled = wait_until(
        lambda: (s := pipeline.status()).replicas_wanted == 1 and s.ready and s,
        90,
        "scaling back down to the minimum once the queue is quiet",
    )
    assert [r for r in settled.replicas if r.alive and r.pipeline_version == settled.pipeline_version]
    pipeline.undeploy()


def test_autoscaling_bounds_are_refused_by_the_sdk_before_any_call() -> None:
    with pytest.raises(ValueError, match="min_replicas <= max_replicas, got min 3 and max 2"):
        Autoscale(3, 2)
    with pytest.raises(
        ValueError, match="queue_age_threshold_s must be a positive number of seconds, got -1"
    ):
        Autoscale(1, 2, queue_age_threshold_s=-1)


@pytest.mark.parametrize(
    ("autoscale", "extra", "message"),
    [
        (Autoscale(1, PARTITIONS + 1), {}, "exceeds the 4 partitions"),
        (Autoscale(1, 2), {"replicas": 3}, "between the autoscaling min"),
        (None, {"cpus": "lots"}, "not a CPU quantity"),
        (None, {"memory": "2 gigs"}, "not a memory quantity"),
    ],
)
def test_bad_deployment_config_is_refused_and_changes_nothing(
    client: Client, iris_model: Path, autoscale: Autoscale | None, extra: dict, message: str
) -> None:
    model = client.upload_model("iris-config", iris_model)
    pipeline = client.build_pipeline("config").add_model_step(model)
    pipeline.create()
    before = pipeline.status()
    with pytest.raises(JoeyError, match=message) as error:
        pipeline.deploy(autoscale=autoscale, wait=False, **extra)
    assert error.value.code == "INVALID_ARGUMENT"
    after = pipeline.status()
    assert (after.status, after.deployment_id) == (before.status, before.deployment_id)


def test_hot_swap_of_a_model_version_is_a_new_pipeline_version_naming_the_new_model(
    client: Client, iris_model: Path, tmp_path: Path
) -> None:
    forest = client.upload_model("iris-swap", iris_model)
    logreg = client.upload_model("iris-swap", train_and_export(tmp_path / "logreg.onnx", "logreg"))
    assert logreg.version == forest.version + 1 and logreg.sha256 != forest.sha256
    pipeline = client.build_pipeline("swap").add_model_step(forest).add_validations(odd="out.label == 1")
    first = pipeline.deploy(timeout=90)
    rows = make_records(20, seed=13)
    before = pipeline.infer(rows, timeout=60)

    second = pipeline.replace_with_model_step(0, logreg).deploy(timeout=120)
    after = pipeline.infer(rows, timeout=60)

    assert second.pipeline_version == first.pipeline_version + 1
    swapped = pipeline.versions()[-1].steps[0]
    assert (swapped.model, swapped.version) == ("iris-swap", logreg.version)
    assert {m["version"] for models in before["metadata.models"] for m in models} == {forest.version}
    assert {m["version"] for models in after["metadata.models"] for m in models} == {logreg.version}
    assert set(after["metadata.pipeline_version"]) == {second.pipeline_version}
    assert "anomaly.odd" in after.columns, "the other steps stay as they were"
    with pytest.raises(IndexError, match="no step at index 5"):
        pipeline.replace_with_model_step(5, forest)
    assert pipeline.remove_step(1).create().version == second.pipeline_version + 1
    pipeline.undeploy()
