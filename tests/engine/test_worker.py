"""A replica's batch loop against the real broker and Redis: a batch whose delivery fails is rewound."""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from joey_core import kafka, topics
from joey_core.kafka import ConsumedRecord
from joey_core.settings import CommonSettings
from joey_engine.deployment import Deployment, from_proto
from joey_engine.pipeline import PipelineRunner
from joey_engine.settings import EngineSettings
from joey_engine.worker import ReplicaWorker
from tests.conftest import free_port, wait_until
from tests.engine.test_engine import TIMEOUT, TopicReader, log_entries, request_id
from tests.engine.test_hostile_records import GOOD_FEATURES, send
from tests.engine.test_pipeline import load


def gather(worker: ReplicaWorker, consumer: Consumer, count: int) -> list[ConsumedRecord]:
    batch: list[ConsumedRecord] = []
    wait_until(lambda: batch.extend(worker._consume(consumer)) or len(batch) >= count, TIMEOUT, "the batch")  # noqa: SLF001
    return batch


def committed(consumer: Consumer, topic: str) -> int:
    [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    return int(tp.offset)


def replica(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_model: Path,
    pipeline: str,
) -> tuple[ReplicaWorker, Deployment]:
    """A replica's worker serving an iris pipeline whose topics exist, run by the test's own calls. Its
    consumer is the test's, built from ``engine_settings`` as a replica's is (SHORT_GROUP_SESSION: it
    joins in 1 s rounds)."""
    deployment = from_proto(make_spec(f"worker-{secrets.token_hex(3)}", pipeline))
    names = deployment.topics
    admin = kafka.admin_client(settings)
    kafka.ensure_topics(
        admin, [kafka.TopicSpec(name, 1) for name in (names.inputs, names.outputs, names.errors)]
    )
    worker = ReplicaWorker(
        engine_settings,
        deployment,
        PipelineRunner(deployment, [load(iris_model)]),
        redis_client,
        "r-test",
        threading.Event(),
        SimpleNamespace(value=0),
    )
    return worker, deployment


def test_a_batch_the_broker_did_not_acknowledge_is_rewound_then_answered_once(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_model: Path,
) -> None:
    worker, deployment = replica(settings, engine_settings, redis_client, make_spec, iris_model, "rewound")
    names = deployment.topics
    rids = [f"r-{i}".encode() for i in range(5)]
    send(settings, names.inputs, [(rid, json.dumps({"features": GOOD_FEATURES}).encode()) for rid in rids])
    consumer = Consumer(kafka.consumer_config(engine_settings, deployment.consumer_group))
    consumer.subscribe([names.inputs], on_assign=worker._on_assign)  # noqa: SLF001
    unreachable = CommonSettings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    away = Producer(kafka.producer_config(unreachable, **{"message.timeout.ms": 300}))
    producer = Producer(kafka.producer_config(settings))
    outputs = TopicReader(settings, names.outputs)
    try:
        batch = gather(worker, consumer, len(rids))
        worker._process(batch, consumer, away)  # noqa: SLF001
        assert committed(consumer, names.inputs) < 0, "nothing committed while undelivered"
        again = gather(worker, consumer, len(rids))
        assert [r.offset for r in again] == [r.offset for r in batch], "rewound to the batch"
        worker._process(again, consumer, producer)  # noqa: SLF001
        assert committed(consumer, names.inputs) == batch[-1].offset + 1
        outputs.read_until(lambda ms: len(ms) >= len(rids), "the answers")
        answered = outputs.drain()
    finally:
        outputs.close()
        consumer.close()
    assert Counter(request_id(m) for m in answered) == Counter(rid.decode() for rid in rids)


def test_an_input_whose_records_the_broker_refuses_for_good_is_answered_alone_and_the_batch_committed(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_model: Path,
) -> None:
    worker, deployment = replica(settings, engine_settings, redis_client, make_spec, iris_model, "refused")
    names = deployment.topics
    good = [f"good-{secrets.token_hex(4)}-{i}".encode() for i in range(4)]
    big = f"big-{secrets.token_hex(4)}".encode()
    # Its output and log carry the whole input: over the producer's limit, while their bounded forms (a few
    # KiB) fit with room to spare: the limit also bounds a whole produce request, which may carry several.
    padded = json.dumps({"features": GOOD_FEATURES, "pad": "x" * 40_000}).encode()
    items = [(rid, json.dumps({"features": GOOD_FEATURES}).encode()) for rid in good]
    items.insert(2, (big, padded))
    send(settings, names.inputs, items)
    consumer = Consumer(kafka.consumer_config(engine_settings, deployment.consumer_group))
    consumer.subscribe([names.inputs], on_assign=worker._on_assign)  # noqa: SLF001
    strict = Producer(kafka.producer_config(settings, **{"message.max.bytes": 20_000}))
    outputs, errors = TopicReader(settings, names.outputs), TopicReader(settings, names.errors)
    logs = TopicReader(settings, topics.LOGS)
    try:
        batch = gather(worker, consumer, len(items))
        worker._process(batch, consumer, strict)  # noqa: SLF001
        assert committed(consumer, names.inputs) == batch[-1].offset + 1, "committed: nothing to retry"
        outputs.read_until(lambda ms: len(ms) >= len(good), "the outputs")
        errors.read_until(lambda ms: len(ms) >= 1, "the error")
        ours = {rid.decode() for rid in [*good, big]}

        def entries(ms: list[Message]) -> list[dict[str, Any]]:
            return [e for e in log_entries(ms) if e["request_id"] in ours]

        logs.read_until(lambda ms: len(entries(ms)) >= len(ours), "the logs")
        answered, failed, logged = outputs.drain(), errors.drain(), logs.drain()
    finally:
        for reader in (outputs, errors, logs):
            reader.close()
        consumer.close()
    assert Counter(request_id(m) for m in answered) == Counter(rid.decode() for rid in good)
    [error] = failed
    assert request_id(error) == big.decode()
    assert "the broker refused its reply record" in json.loads(error.value())["error"]  # type: ignore[arg-type]
    ok = Counter()
    for entry in entries(logged):
        ok[(entry["request_id"], entry["ok"])] += 1
    assert ok == Counter({**{(rid.decode(), True): 1 for rid in good}, (big.decode(), False): 1})


def test_a_batch_rewound_more_times_in_a_row_than_allowed_stops_the_replica_uncommitted(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    iris_model: Path,
) -> None:
    bounded = engine_settings.model_copy(update={"max_delivery_rewinds": 1, "delivery_retry_max_s": 0.1})
    worker, deployment = replica(settings, bounded, redis_client, make_spec, iris_model, "bounded")
    names = deployment.topics
    send(settings, names.inputs, [(b"r-0", json.dumps({"features": GOOD_FEATURES}).encode())])
    consumer = Consumer(kafka.consumer_config(engine_settings, deployment.consumer_group))
    consumer.subscribe([names.inputs], on_assign=worker._on_assign)  # noqa: SLF001
    unreachable = CommonSettings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    away = Producer(kafka.producer_config(unreachable, **{"message.timeout.ms": 300}))
    try:
        worker._process(gather(worker, consumer, 1), consumer, away)  # noqa: SLF001
        again = gather(worker, consumer, 1)
        with pytest.raises(RuntimeError, match="did not acknowledge a batch 2 times in a row"):
            worker._process(again, consumer, away)  # noqa: SLF001
        assert committed(consumer, names.inputs) < 0, "nothing committed"
    finally:
        consumer.close()
