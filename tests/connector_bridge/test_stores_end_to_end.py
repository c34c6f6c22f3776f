"""Every store a bridge reads or writes, at once, through one deployed pipeline and one connector-bridge
process killed -9 mid-stream: files, S3 (moto's server) and an external Kafka topic (the session's
broker, other topics) as sources; Postgres, files, S3, Kafka, HTTP (a receiver of the test's, failing
its first POSTs) and a sink of the pipeline's inference logs as sinks; a second pipeline (a python step
naming the species) chained to the first by a source of its results, with a Postgres sink of its own.
The files sink's directory also goes away for longer than the consumer's max.poll.interval.ms while the
bridge runs.

Every sink then holds every input exactly once (the Kafka topic and the HTTP receiver at least once per
request id, as documented), each source's rows_moved is exactly its inputs, and the sinks of one
pipeline's results all count the same rows."""

from __future__ import annotations

import http.server
import io
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from joey.client import Bridge
from joey_core.settings import CommonSettings
from tests.conftest import ServiceProcess, Stack, wait_until
from tests.connector_bridge.helpers import (
    FEATURES,
    assert_results,
    deployed_pipeline,
    start_bridge,
    table_rows,
)
from tests.externals import external_database, s3_server

MAX_POLL_MS = 3000
"""The bridge's max.poll.interval.ms: the files sink's outage lasts longer."""
HOOK_TOKEN = f"hook-{secrets.token_hex(6)}"
SOURCES = ("files-feed", "s3-feed", "kafka-feed")
POSTPROCESS = Path(__file__).resolve().parents[2] / "examples" / "steps" / "iris_postprocess.py"
RESULT_SINKS = ("pg-results", "files-results", "s3-results", "kafka-results", "http-results")


class Receiver(http.server.ThreadingHTTPServer):
    """Answers 503 to its first ``failures`` POSTs, then 200; keeps the rows of the batches it took."""

    failures = 3
    refused = 0
    rows: list[dict[str, Any]]
    authorized: set[str]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.refused < self.server.failures:
            self.server.refused += 1
            status = 503
        else:
            status = 200
            self.server.rows += body["rows"]
            self.server.authorized.add(self.headers["Authorization"])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class Scenario:
    expected: set[str] = field(default_factory=set)
    inputs: dict[str, int] = field(default_factory=dict)
    """Per source, how many records it was given."""
    bridges: dict[str, Bridge] = field(default_factory=dict)
    results: dict[str, Callable[[], list[tuple]]] = field(default_factory=dict)
    """Per sink, its rows as (request_id, source_key, outputs, error, pipeline_version)."""
    log: str = ""
    secrets: tuple[str, ...] = ()


def as_row(request_id: str, columns: dict[str, Any]) -> tuple:
    """A sink's columns as :func:`table_rows` gives them."""
    return (
        request_id,
        columns["source_key"],
        columns["outputs"],
        columns["error"],
        columns["pipeline_version"],
    )


def parquet_rows(tables: list[bytes]) -> list[tuple]:
    found = []
    for data in tables:
        for r in pq.read_table(pa.BufferReader(data)).to_pylist():
            found.append(as_row(r["request_id"], r | {"outputs": r["outputs"] and json.loads(r["outputs"])}))
    return found


def jsonl(first: int, count: int) -> bytes:
    return "".join(
        json.dumps({"id": i, "features": FEATURES}) + "\n" for i in range(first, first + count)
    ).encode()


def csv(first: int, count: int) -> bytes:
    return ("id,features\n" + "".join(f'{i},"{FEATURES}"\n' for i in range(first, first + count))).encode()


def parquet(first: int, count: int) -> bytes:
    buffer = io.BytesIO()
    ids = list(range(first, first + count))
    pq.write_table(pa.table({"id": ids, "features": [FEATURES] * count}), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenario(
    stack: Stack,
    settings: CommonSettings,
    iris_model: Path,
    service_factory: Callable[..., ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scenario]:
    base = tmp_path_factory.mktemp("stores")
    inbox, outbox = base / "in", base / "out"
    inbox.mkdir()
    outbox.mkdir()
    suffix = secrets.token_hex(3)
    ext_in, ext_out = f"ext-in-{suffix}", f"ext-out-{suffix}"
    bootstrap = stack.env["JOEY_KAFKA_BOOTSTRAP"]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, num_partitions=1) for t in (ext_in, ext_out)]).values():
        future.result(15)
    receiver = Receiver(("127.0.0.1", 0), Handler)
    receiver.rows, receiver.authorized = [], set()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with (
        external_database() as db,
        s3_server() as s3,
        deployed_pipeline(settings, iris_model, "stores-e2e") as world,
    ):
        found = Scenario(secrets=(s3.secret_access_key, HOOK_TOKEN))
        client = world.client
        bucket = s3.client()
        s3_details = {
            "bucket": s3.bucket,
            "endpoint": s3.endpoint,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        }
        rolling = {"roll_rows": 25, "roll_seconds": 1}
        producer = Producer({"bootstrap.servers": bootstrap})
        kafka_sent = 0

        def put_file(name: str, data: bytes, count: int) -> None:
            temporary = inbox / f".{name}.tmp"  # written aside, then renamed: never read half-written
            temporary.write_bytes(data)
            os.replace(temporary, inbox / name)
            found.expected |= {f"files-feed/{name}/{i}" for i in range(count)}
            found.inputs["files-feed"] = found.inputs.get("files-feed", 0) + count

        def put_object(name: str, data: bytes, count: int) -> None:
            bucket.put_object(Bucket=s3.bucket, Key=f"feed/{name}", Body=data)
            found.expected |= {f"s3-feed/{name}/{i}" for i in range(count)}
            found.inputs["s3-feed"] = found.inputs.get("s3-feed", 0) + count

        def send(count: int) -> None:
            nonlocal kafka_sent
            for _ in range(count):
                producer.produce(ext_in, json.dumps({"features": FEATURES}).encode())
            assert producer.flush(15) == 0
            found.expected |= {f"kafka-feed/0/{o}" for o in range(kafka_sent, kafka_sent + count)}
            kafka_sent += count
            found.inputs["kafka-feed"] = kafka_sent

        put_file("a-000.jsonl", jsonl(0, 40), 40)
        put_file("a-001.csv", csv(40, 40), 40)
        put_object("a-000.parquet", parquet(0, 40), 40)
        put_object("a-001.jsonl", jsonl(40, 40), 40)
        send(80)

        connections = {
            "in-files": ("files", {"path": str(inbox)}),
            "in-s3": ("s3", s3_details | {"prefix": "feed"}),
            "in-kafka": ("kafka", {"bootstrap": bootstrap, "topic": ext_in}),
            "out-pg": ("postgres", {"url": db, "table": "results"}),
            "out-logs": ("postgres", {"url": db, "table": "logs"}),
            "out-files": ("files", {"path": str(outbox)} | rolling),
            "out-s3": ("s3", s3_details | {"prefix": "results"} | rolling),
            "out-kafka": ("kafka", {"bootstrap": bootstrap, "topic": ext_out}),
            "out-http": (
                "http",
                {
                    "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                    "headers": {"Authorization": f"Bearer {HOOK_TOKEN}"},
                },
            ),
        }
        for name, (kind, details) in connections.items():
            client.create_connection(name, kind, details)
        for name, connection in zip(SOURCES, ("in-files", "in-s3", "in-kafka"), strict=True):
            found.bridges[name] = client.create_source(name, connection=connection, pipeline=world.pipeline)
        for name, connection in zip(
            RESULT_SINKS, ("out-pg", "out-files", "out-s3", "out-kafka", "out-http"), strict=True
        ):
            found.bridges[name] = client.create_sink(name, pipeline=world.pipeline, connection=connection)
        found.bridges["pg-logs"] = client.create_sink(
            "pg-logs", pipeline=world.pipeline, connection="out-logs", what="logs"
        )
        post = client.upload_model(
            "iris-post",
            POSTPROCESS,
            framework="python",
            input_schema={"label": ("int64", (-1,)), "probabilities": ("float32", (-1, 3))},
            output_schema={"species": ("string", (-1,)), "confidence": ("float32", (-1,))},
        )
        species = client.build_pipeline("species").add_model_step(post)
        species.deploy(replicas=1, timeout=90)
        client.create_connection("out-species", "postgres", {"url": db, "table": "species"})
        found.bridges["chain"] = client.create_source(
            "chain", pipeline="species", from_pipeline=world.pipeline
        )
        found.bridges["species-results"] = client.create_sink(
            "species-results", pipeline="species", connection="out-species"
        )

        def s3_results() -> list[tuple]:
            listed = bucket.list_objects_v2(Bucket=s3.bucket, Prefix="results/").get("Contents", [])
            return parquet_rows(
                [bucket.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed]
            )

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{suffix}"})
        consumer.assign([TopicPartition(ext_out, 0, 0)])
        kafka_records: dict[str, dict[str, Any]] = {}

        def kafka_results() -> list[tuple]:
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    kafka_records[message.key().decode()] = json.loads(message.value())  # type: ignore[union-attr,arg-type]
            return [as_row(k, r) for k, r in kafka_records.items()]

        def http_results() -> list[tuple]:
            # Deduplicated by request id, as the receiver is told to.
            latest = {r["request_id"]: r for r in receiver.rows}
            return [as_row(k, r) for k, r in latest.items()]

        found.results = {
            "pg-results": lambda: table_rows(db, "results"),
            "pg-logs": lambda: table_rows(db, "logs"),
            "files-results": lambda: parquet_rows([p.read_bytes() for p in sorted(outbox.glob("*.parquet"))]),
            "s3-results": s3_results,
            "kafka-results": kafka_results,
            "http-results": http_results,
            "species-results": lambda: table_rows(db, "species"),
        }

        def every_sink_has(count: int) -> bool:
            return all(len(rows()) >= count for rows in found.results.values())

        bridge = start_bridge(service_factory, stack.env, {"max.poll.interval.ms": MAX_POLL_MS})
        wait_until(lambda: every_sink_has(1), 90, "results in every sink")
        killed = bridge
        bridge.kill9()
        at_kill = {sink: len(rows()) for sink, rows in found.results.items()}
        print(f"killed with {at_kill} of {len(found.expected)} results in the sinks")  # noqa: T201

        put_file("b-000.jsonl", jsonl(80, 40), 40)
        put_object("b-000.csv", csv(80, 40), 40)
        send(40)
        # The files sink's directory goes away, for longer than the consumer's max.poll.interval.ms.
        away = base / "out.away"
        os.rename(outbox, away)
        bridge = start_bridge(service_factory, stack.env, {"max.poll.interval.ms": MAX_POLL_MS})
        files_sink = found.bridges["files-results"]
        wait_until(
            lambda: str(outbox) in files_sink.status().last_error, 60, "the files sink retrying, and why"
        )
        assert files_sink.status().state == "retrying"
        retries = f"bridge {client.workspace}/files-results retries"
        # 0.2 + 0.4 + 0.5 s ... between retries: 9 of them outlast the poll interval (3 s).
        wait_until(
            lambda: bridge.log_text().count(retries) >= 9, 60, "the outage outlasting max.poll.interval.ms"
        )
        os.rename(away, outbox)

        wait_until(lambda: every_sink_has(len(found.expected)), 120, "every input in every sink")
        wait_until(
            lambda: all(found.bridges[s].status().rows_moved == found.inputs[s] for s in SOURCES),
            30,
            "the sources' counts",
        )
        wait_until(
            lambda: len({found.bridges[s].status().rows_moved for s in RESULT_SINKS}) == 1,
            30,
            "the sinks of the results counting alike",
        )
        bridge.stop()
        found.log = killed.log_text() + bridge.log_text()
        try:
            yield found
        finally:
            species.undeploy()
            receiver.shutdown()
            receiver.server_close()
            consumer.close()


@pytest.mark.parametrize("sink", [*RESULT_SINKS, "pg-logs"])
def test_every_input_is_one_row_in_each_sink_across_a_kill_9_and_an_outage(
    scenario: Scenario, sink: str
) -> None:
    found = scenario.results[sink]()
    if sink in ("files-results", "s3-results"):
        # One row per result record: none written twice by the sink's replay. An input the source sent
        # again after the kill is answered twice: readers keep one row per request id.
        assert len(found) == scenario.bridges["pg-results"].status().rows_moved
        assert_results(found, scenario.expected, unique=False)
    else:
        assert_results(found, scenario.expected)


def test_a_pipeline_fed_by_anothers_results_answers_each_of_them_once(scenario: Scenario) -> None:
    found = scenario.results["species-results"]()
    ids = [r[0] for r in found]
    assert len(ids) == len(set(ids))
    assert set(ids) == {f"chain/{request_id}" for request_id in scenario.expected}
    assert {r[2]["species"] for r in found} == {"setosa"}, found[:3]
    assert all(r[3] is None for r in found), [r for r in found if r[3]][:3]


def test_the_counts_are_exact_and_no_secret_reaches_the_log(scenario: Scenario) -> None:
    for source in SOURCES:
        assert scenario.bridges[source].status().rows_moved == scenario.inputs[source], source
    counted = scenario.bridges["pg-results"].status().rows_moved
    # Each result record once, a replayed one too (an input sent again after the kill is answered twice).
    assert counted >= len(scenario.expected)
    assert "maximum poll interval" not in scenario.log.lower(), "the files sink's consumer left its group"
    for secret in scenario.secrets:
        assert secret not in scenario.log
