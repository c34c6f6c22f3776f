"""The baseline: a plain hand-written confluent-kafka inference loop, no Joey code on the hot path.

Each replica is a thread with its own consumer and producer in one consumer group, like
the engine's replicas. A batch is: wait for one record, then up to ``--batch-delay-ms``
for more (at most ``--batch-size``), JSON-decode, stack into one float32 array, one
onnxruntime run, produce one JSON output per record (headers copied), flush, commit.

The Kafka client settings are Joey's own (``joey_core.kafka.consumer_config`` /
``producer_config``) so the comparison measures Joey's code, not different client tuning.

Prints ``READY`` on stdout once the group's partitions are all assigned; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from joey_core.kafka import consumer_config, producer_config
from joey_core.settings import CommonSettings


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
                process(records, session, producer, args.output_topic)
                consumer.commit(offsets=next_offsets(records), asynchronous=False)
    finally:
        consumer.close()
        producer.flush(10)


def process(records: list[Message], session: ort.InferenceSession, producer: Producer, topic: str) -> None:
    features = np.asarray([json.loads(m.value())["features"] for m in records], dtype=np.float32)
    labels, probabilities = session.run(["label", "probabilities"], {"features": features})
    failed: list[object] = []
    for message, label, probs in zip(records, labels.tolist(), probabilities.tolist(), strict=True):
        value = json.dumps({"label": label, "probabilities": probs}).encode()
        producer.produce(
            topic,
            value,
            key=message.key(),
            headers=message.headers(),
            on_delivery=lambda err, msg: failed.append(err) if err else None,
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
