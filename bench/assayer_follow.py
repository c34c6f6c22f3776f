"""Records/s at which the live assayer follows ``joey.logs``, against a bare consumer, in one run.

The assayer reads every log record only to advance event-time watermarks and its read positions
(``Assayer.observe``); it has to keep up with the engine's full log rate (at most about
26,000-31,000 records/s on the 2-core machine of docs/performance.md, "drain").

``--records`` Avro inference logs (the engine's shape, four pipelines, event time rising by 1 ms
per log) are written twice, round-robin to fresh topics of ``--partitions`` partitions: in batch
records of ``--batch`` logs of one pipeline (``joey.v1.InferenceLogBatch``, what the engine writes)
and in the old format, one ``joey.v1.InferenceLog`` record per log. Every system then reads a whole
topic from the beginning with a fresh group id, assigned every partition and polling
``consume(1000, tick_s)`` like the assayer:

* consume-only: nothing is done with a batch. The floor of any follower.
* assayer observe: each batch goes to a real ``Assayer(settings, store).observe``; at the end its
  watermarks must equal the latest event time written per pipeline and its positions the
  partition ends, so a no-op cannot pass.
* logger decode: ``decode_log_entries`` of ``ConsumedRecord.of(m)`` for every message, what the logger
  does before writing a batch; for comparison.

Figures are logs (inferences) per second, whatever the format.

Each system runs once as a warm-up, then ``--repeats`` times, the order rotating from one
repetition to the next; each figure is the median. The embedded broker is started unless
``--bootstrap`` names one.

    python bench/assayer_follow.py --records 200000 --repeats 3 --batch 256
"""

from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from joey_assayer.service import POLL_RECORDS, Assayer
from joey_assayer.settings import AssayerSettings
from joey_assayer.store import AssayerStore
from joey_cli.broker import EmbeddedBroker
from joey_core.kafka import (
    ConsumedRecord,
    DeliveryTracker,
    TopicSpec,
    admin_client,
    consumer_config,
    ensure_topics,
    producer_config,
)
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    decode_log_entries,
    encode_log,
    encode_log_batch,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
from engine_throughput import free_port, interrupt, scratch_database  # noqa: E402

WORKSPACE = "default"
PIPELINES = 4
T0 = datetime(2025, 1, 1, tzinfo=UTC)
STALL_S = 60.0
"""A run that reads nothing for this long has lost records: fail rather than wait forever."""


def log_record(i: int) -> dict[str, Any]:
    """The i-th inference log, spread over the bench's pipelines, event time rising by 1 ms."""
    pipeline = f"bench-{i % PIPELINES}"
    inputs = f'{{"features": [{5 + i % 30 / 10}, 3.4, 1.5, 0.2]}}'
    return measure.log_record(WORKSPACE, pipeline, i, T0 + timedelta(milliseconds=i), inputs)


@dataclass(frozen=True)
class Written:
    """What a reader of the topic must end up with."""

    topic: str
    records: int
    rows: int
    """Log rows (inferences) the records hold."""
    ends: dict[int, int]
    """Next offset after the last record, per partition."""
    watermarks: dict[tuple[str, str], datetime]
    """Latest event time per (workspace, pipeline)."""


def log_values(rows: int, batch: int) -> Iterator[tuple[bytes, str]]:
    """(value, content type) of ``rows`` logs: one old-format record each when ``batch`` is 0, else
    batch records of up to ``batch`` logs of one pipeline, as the engine writes a micro-batch."""
    if not batch:
        for i in range(rows):
            yield encode_log(log_record(i)), LOG_CONTENT_TYPE
        return
    for first in range(0, rows, batch * PIPELINES):
        for p in range(PIPELINES):
            entries = [
                log_record(i) for i in range(first + p, min(first + batch * PIPELINES, rows), PIPELINES)
            ]
            if entries:
                yield encode_log_batch(entries), LOG_BATCH_CONTENT_TYPE


def write_logs(settings: AssayerSettings, topic: str, partitions: int, rows: int, batch: int) -> Written:
    # Room for every record in the local queue: produce() never has to wait for deliveries.
    producer = Producer(producer_config(settings, **{"queue.buffering.max.messages": rows}))
    tracker = DeliveryTracker()
    ends = dict.fromkeys(range(partitions), 0)

    def delivered(err: KafkaError | None, msg: Message) -> None:
        tracker.on_delivery(err, msg)
        partition, offset = msg.partition(), msg.offset()
        if err is None and partition is not None and offset is not None:
            ends[partition] = max(ends[partition], offset + 1)

    watermarks: dict[tuple[str, str], datetime] = {}
    for i in range(rows):
        record = log_record(i)
        key = (record["workspace"], record["pipeline"])
        watermarks[key] = max(watermarks.get(key, record["time"]), record["time"])
    records = 0
    for records, (value, content_type) in enumerate(log_values(rows, batch), start=1):
        headers = [(CONTENT_TYPE_HEADER, content_type.encode())]
        producer.produce(topic, value, partition=records % partitions, headers=headers, on_delivery=delivered)
        producer.poll(0)
    tracker.flush(producer, timeout=120)
    if sum(ends.values()) != records:
        raise RuntimeError(f"{sum(ends.values())} of {records} records acknowledged at consecutive offsets")
    return Written(topic, records, rows, ends, watermarks)


def follow(settings: AssayerSettings, written: Written, handle: Callable[[list[Message]], object]) -> float:
    """Seconds to read the whole topic from its beginning, every batch passed to ``handle``."""
    consumer = Consumer(consumer_config(settings, f"bench-follow-{secrets.token_hex(4)}"))
    partitions = [TopicPartition(written.topic, p) for p in sorted(written.ends)]
    consumer.assign(partitions)
    try:
        read = 0
        began = last_read = time.perf_counter()
        while read < written.records:
            # Never ask for more than is left: the last poll would wait out its timeout.
            messages = consumer.consume(min(POLL_RECORDS, written.records - read), timeout=settings.tick_s)
            handle(messages)
            read += len(messages)
            now = time.perf_counter()
            if messages:
                last_read = now
            elif now - last_read > STALL_S:
                raise TimeoutError(
                    f"read {read} of {written.records} records, then nothing for {STALL_S:.0f}s"
                )
        elapsed = time.perf_counter() - began
        positions = {tp.partition: tp.offset for tp in consumer.position(partitions)}
    finally:
        consumer.close()
    if positions != written.ends:
        raise RuntimeError(f"consumer stopped at {positions}, the partitions end at {written.ends}")
    return elapsed


def consume_only(settings: AssayerSettings, store: AssayerStore, written: Written) -> float:
    return follow(settings, written, lambda messages: None)


def assayer_observe(settings: AssayerSettings, store: AssayerStore, written: Written) -> float:
    assayer = Assayer(settings, store)
    elapsed = follow(settings, written, assayer.observe)
    if assayer.watermarks != written.watermarks:
        raise RuntimeError(f"assayer watermarks {assayer.watermarks}, written {written.watermarks}")
    if assayer.positions != {p: end for p, end in written.ends.items() if end}:
        raise RuntimeError(f"assayer positions {assayer.positions}, partition ends {written.ends}")
    return elapsed


def logger_decode(settings: AssayerSettings, store: AssayerStore, written: Written) -> float:
    decoded = 0

    def decode(messages: list[Message]) -> None:
        nonlocal decoded
        for record in map(ConsumedRecord.of, messages):
            decoded += len(decode_log_entries(record.headers, record.value))

    elapsed = follow(settings, written, decode)
    if decoded != written.rows:
        raise RuntimeError(f"decoded {decoded} of {written.rows} rows")
    return elapsed


SYSTEMS: dict[str, Callable[[AssayerSettings, AssayerStore, Written], float]] = {
    "consume-only": consume_only,
    "assayer observe": assayer_observe,
    "logger decode": logger_decode,
}


@contextmanager
def scratch_topic(settings: AssayerSettings, partitions: int) -> Iterator[str]:
    admin = admin_client(settings)
    name = f"bench.assayer-follow.{secrets.token_hex(4)}"
    ensure_topics(admin, [TopicSpec(name, partitions)])
    try:
        yield name
    finally:
        for future in admin.delete_topics([name], operation_timeout=15).values():
            future.result(15)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="logs per batch record (the engine's batch)")
    parser.add_argument("--bootstrap", help="an existing Kafka broker instead of the embedded one")
    args = parser.parse_args()

    # SIGTERM unwinds like Ctrl-C, so the broker, topic and scratch database are cleaned up.
    signal.signal(signal.SIGTERM, interrupt)
    formats = {"batched": args.batch, "old": 0}
    runs = [(f, system) for f in formats for system in SYSTEMS]
    samples: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    written: dict[str, Written] = {}
    with ExitStack() as stack:
        bootstrap = args.bootstrap
        if bootstrap is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-bench-")))
            bootstrap = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log")).bootstrap
        settings = AssayerSettings(
            kafka_bootstrap=bootstrap, database_url=stack.enter_context(scratch_database())
        )
        store = AssayerStore(settings.database_url.get_secret_value())
        stack.callback(store.close)
        for name, batch in formats.items():
            topic = stack.enter_context(scratch_topic(settings, args.partitions))
            began = time.perf_counter()
            written[name] = write_logs(settings, topic, args.partitions, args.records, batch)
            print(
                f"{name}: wrote {args.records:,} logs in {written[name].records:,} records to "
                f"{args.partitions} partitions in {time.perf_counter() - began:.1f} s"
            )
        for f, system in runs:
            SYSTEMS[system](settings, store, written[f])
        for repeat in range(args.repeats):
            for f, system in runs[repeat % len(runs) :] + runs[: repeat % len(runs)]:
                samples[(f, system)].append(SYSTEMS[system](settings, store, written[f]))

    floor = statistics.median(samples[("old", "consume-only")])
    print(
        f"\n{args.records:,} logs, {args.partitions} partitions, batch records of {args.batch}, "
        f"median of {args.repeats} runs\n"
    )
    print("| format | system | records | median s | logs/s | time / old consume-only |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (f, system), seconds in samples.items():
        median = statistics.median(seconds)
        print(
            f"| {f} | {system} | {written[f].records:,} | {median:.2f} | {args.records / median:,.0f} | "
            f"{median / floor:.2f}x |"
        )
    print("\nlogs/s per run:")
    for (f, system), seconds in samples.items():
        print(f"  {f} {system}: " + " / ".join(f"{args.records / s:,.0f}" for s in seconds))


if __name__ == "__main__":
    main()
