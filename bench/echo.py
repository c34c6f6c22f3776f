"""The echo: the engine's Kafka loop with no model, the floor of any request/reply pipeline on a broker.

One consumer in a consumer group and one producer, with the engine's own client settings and
batching (``EngineSettings`` from the same JOEY_* environment): wait for a record with
``poll``, take whatever else comes within ``JOEY_MAX_BATCH_DELAY_MS`` (at most
``JOEY_MAX_BATCH_SIZE``), produce each record's value back to the output topic with its
headers (so its request id), flush, commit. What a replica adds on top of this is Joey's own
work: decoding, the model, the output and log records.

Prints ``READY`` on stdout once its group owns every partition of the input topic; SIGTERM stops it.

    python bench/echo.py --input-topic T --output-topic U --group G --partitions 4
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from confluent_kafka import Consumer, Message, Producer

from joey_core import kafka
from joey_engine.settings import EngineSettings
from joey_engine.worker import IDLE_POLL_S

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import Assignment, next_offsets  # noqa: E402

log = logging.getLogger("echo")


def echo(records: list[Message], producer: Producer, topic: str) -> None:
    failed: list[object] = []
    for message in records:
        producer.produce(
            topic,
            message.value(),
            key=message.key(),
            headers=message.headers(),
            on_delivery=lambda err, msg: failed.append(err) if err else None,
        )
    # As the engine does: answers acknowledged before the input offsets are committed.
    if producer.flush(30) or failed:
        raise RuntimeError(f"answers not acknowledged: {failed[:1] or 'flush timed out'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    args = parser.parse_args()

    settings = EngineSettings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    assignment = Assignment(args.partitions)
    consumer = Consumer(kafka.consumer_config(settings, args.group))
    producer = Producer(kafka.producer_config(settings))
    consumer.subscribe(
        [args.input_topic],
        on_assign=lambda c, ps: assignment.update(0, ps, True),
        on_revoke=lambda c, ps: assignment.update(0, ps, False),
    )
    delay = settings.max_batch_delay_ms / 1000
    try:
        while not stop.is_set():
            first = consumer.poll(IDLE_POLL_S)
            if first is None:
                continue
            batch = [first]
            if settings.max_batch_size > 1:
                batch += consumer.consume(settings.max_batch_size - 1, delay)
            records = kafka.usable(batch, log)
            if records:
                echo(records, producer, args.output_topic)
                consumer.commit(offsets=next_offsets(records), asynchronous=False)
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
