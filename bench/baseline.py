"""The baseline: a plain hand-written confluent-kafka inference loop, no Joey code on the hot path.

Each replica is a thread with its own consumer and producer in one consumer group, like
the engine's replicas. A batch is: wait for one record, then up to ``--batch-delay-ms``
for more (at most ``--batch-size``), JSON-decode, stack into one float32 array, one
onnxruntime run, produce one JSON output per record (headers copied), flush, commit.

With ``--joey-bytes`` the same loop writes what Joey writes, to tell the broker's cost of bytes
from the cost of Joey's code: each output is Joey's record shape (time, request id, the input's
own text, the outputs, check failures, a metadata object with the same members: workspace,
pipeline, version, deployment, models with the model's sha256, partition, offset, elapsed ns),
and each batch adds one record to ``--log-topic`` of ``--log-bytes-per-record`` bytes per input,
made of the batch's input and output texts (as Joey's log holds them, so lz4 compresses it alike).

The Kafka client settings are Joey's own (``joey_core.kafka.consumer_config`` /
``producer_config``) so the comparison measures Joey's code, not different client tuning.

Prints ``READY`` on stdout once the group's partitions are all assigned; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from joey_core.kafka import consumer_config, producer_config
from joey_core.records import REQUEST_ID_HEADER
from joey_core.settings import CommonSettings


@dataclass(frozen=True)
class JoeyBytes:
    """What ``--joey-bytes`` adds to every output and batch."""

    models: list[dict[str, object]]
    log_topic: str
    log_bytes_per_record: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> JoeyBytes | None:
        if not args.joey_bytes:
            return None
        with open(args.model, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
        return cls(
            [{"name": "iris", "version": 1, "sha256": sha256}], args.log_topic, args.log_bytes_per_record
        )

    def output(self, message: Message, decoded: object, outputs: dict[str, object], elapsed_ns: int) -> bytes:
        rid = next((v.decode() for k, v in message.headers() or () if k == REQUEST_ID_HEADER), "")
        return json.dumps(
            {
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "request_id": rid,
                "in": decoded,
                "out": outputs,
                "check_failures": [],
                "metadata": {
                    "workspace": "default",
                    "pipeline": "bench",
                    "pipeline_version": 1,
                    "deployment_id": "bench-1",
                    "models": self.models,
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "elapsed_ns": [elapsed_ns],
                },
            },
            separators=(",", ":"),
        ).encode()

    def log(self, records: list[Message], outputs: list[bytes]) -> bytes:
        size = self.log_bytes_per_record * len(records)
        texts = b"".join(v for m, out in zip(records, outputs, strict=True) for v in (m.value(), out))
        return (texts * (size // len(texts) + 1))[:size]


class Assignment:
    """Partitions held by the replicas together; announces READY once they cover the topic."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.held: dict[int, set[int]] = {}
        self.lock = threading.Lock()
        self.announced = False

    def update(self, replica: int, partitions: list[TopicPartition], assigned: bool) -> None:
        with self.lock:
            mine = self.held.setdefault(replica, set())
            ids = {p.partition for p in partitions}
            if assigned:
                mine |= ids
            else:
                mine -= ids
            covered = set().union(*self.held.values())
            if not self.announced and len(covered) >= self.partitions:
                self.announced = True
                print("READY", flush=True)


def run_replica(
    replica: int,
    args: argparse.Namespace,
    settings: CommonSettings,
    assignment: Assignment,
    stop: threading.Event,
) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    joey = JoeyBytes.of(args)
    consumer = Consumer(consumer_config(settings, args.group))
    producer = Producer(producer_config(settings))
    consumer.subscribe(
        [args.input_topic],
        on_assign=lambda c, ps: assignment.update(replica, ps, True),
        on_revoke=lambda c, ps: assignment.update(replica, ps, False),
    )
    delay = args.batch_delay_ms / 1000
    try:
        while not stop.is_set():
            first = consumer.poll(0.2)
            if first is None:
                continue
            batch = [first, *consumer.consume(args.batch_size - 1, delay)] if args.batch_size > 1 else [first]
            records = [m for m in batch if m.error() is None]
            if records:
                process(records, session, producer, args.output_topic, joey)
                consumer.commit(offsets=next_offsets(records), asynchronous=False)
    finally:
        consumer.close()
        producer.flush(10)


def process(
    records: list[Message],
    session: ort.InferenceSession,
    producer: Producer,
    topic: str,
    joey: JoeyBytes | None = None,
) -> None:
    inputs = [json.loads(m.value()) for m in records]
    features = np.asarray([i["features"] for i in inputs], dtype=np.float32)
    started = time.perf_counter_ns()
    labels, probabilities = session.run(["label", "probabilities"], {"features": features})
    elapsed_ns = time.perf_counter_ns() - started
    failed: list[object] = []

    def delivered(err: object, msg: object) -> None:
        if err:
            failed.append(err)

    values = []
    rows = zip(records, inputs, labels.tolist(), probabilities.tolist(), strict=True)
    for message, decoded, label, probs in rows:
        outputs = {"label": label, "probabilities": probs}
        if joey is None:
            value = json.dumps(outputs).encode()
        else:
            value = joey.output(message, decoded, outputs, elapsed_ns)
        values.append(value)
        producer.produce(topic, value, key=message.key(), headers=message.headers(), on_delivery=delivered)
    if joey is not None:
        producer.produce(
            joey.log_topic, joey.log(records, values), key=records[0].key(), on_delivery=delivered
        )
    # At-least-once, as in Joey: outputs acknowledged before the input offsets are committed.
    if producer.flush(30) or failed:
        raise RuntimeError(f"outputs not acknowledged: {failed[:1] or 'flush timed out'}")


def next_offsets(records: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in records:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batch-delay-ms", type=float, default=5)
    parser.add_argument(
        "--joey-bytes", action="store_true", help="write Joey's output shape and batched logs"
    )
    parser.add_argument(
        "--log-topic", default="", help="with --joey-bytes: where the batch's log record goes"
    )
    parser.add_argument("--log-bytes-per-record", type=int, default=340, help="with --joey-bytes")
    parser.add_argument("--dev-timeouts", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    settings = CommonSettings(kafka_bootstrap=args.bootstrap, kafka_dev_timeouts=args.dev_timeouts)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    assignment = Assignment(args.partitions)
    failed = threading.Event()

    def replica(i: int) -> None:
        try:
            run_replica(i, args, settings, assignment, stop)
        except Exception:
            # One broken replica invalidates the measurement: stop everything and say so.
            failed.set()
            stop.set()
            raise

    threads = [threading.Thread(target=replica, args=(i,), name=f"replica-{i}") for i in range(args.replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.exit(1 if failed.is_set() else 0)


if __name__ == "__main__":
    main()
