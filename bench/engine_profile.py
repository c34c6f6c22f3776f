"""Where a replica's time goes per record, stage by stage, in-process (no broker).

The engine's own functions run on batches of ``--batch-size`` iris records (the model and records of
bench/engine_throughput.py), each stage timed on its own over ``--batches`` batches, repeated
``--repeats`` times; the table shows the best and the median µs per record of each stage and the spread of
the repeats (on a loaded machine the best is the cost, the rest is waiting for a core). Produce calls go
to a producer whose broker is unreachable (each batch's records are purged), so they measure the call, not
the delivery; attempt notes go to the Redis of ``--redis``. The broker round trips (flush, commit) and the
consumer's fetch are not here: bench/engine_throughput.py measures them with the rest.

    python bench/engine_profile.py --batch-size 256 --batches 20 --repeats 9
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Message, Producer

from joey_core import kafka, records
from joey_core.kafka import ConsumedRecord
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2
from joey_engine import produced_records
from joey_engine.attempts import AttemptNotes
from joey_engine.deployment import from_proto
from joey_engine.pipeline import PipelineRunner
from joey_engine.runtime import create_runtime
from joey_engine.settings import EngineSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from train_model import make_records, train_and_export  # noqa: E402

FLOAT = registry_pb2.TensorSpec


def deployment_spec(sha256: str) -> registry_pb2.DeploymentSpec:
    step = registry_pb2.ResolvedStep(
        model="iris",
        version=1,
        sha256=sha256,
        framework="onnx",
        inputs=[FLOAT(name="features", dtype="float32", shape=[-1, 4])],
        outputs=[
            FLOAT(name="label", dtype="int64", shape=[-1]),
            FLOAT(name="probabilities", dtype="float32", shape=[-1, 3]),
        ],
    )
    return registry_pb2.DeploymentSpec(
        workspace="default",
        pipeline="bench",
        pipeline_version=1,
        replicas=1,
        deployment_id="0" * 16,
        steps=[step],
    )


def messages(count: int, batch: int) -> list[list[Message]]:
    """Input records as the consumer hands them over: a request id and a deadline header each."""
    rows = make_records(count)
    now_ms = int(time.time() * 1000)
    made = [
        Message(
            topic="joey.default.bench.inputs",
            partition=i % 4,
            offset=i,
            key=None,
            value=orjson.dumps(row),
            headers=[
                (records.REQUEST_ID_HEADER, secrets.token_hex(8).encode()),
                (records.DEADLINE_HEADER, str(now_ms + 3_600_000).encode()),
            ],
            timestamp=(1, now_ms),
        )
        for i, row in enumerate(rows)
    ]
    return [made[i : i + batch] for i in range(0, count, batch)]


class Stages:
    """Times what each stage does to every batch; each stage's input is made by the stages before it."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        settings = EngineSettings(redis_prefix=f"profile-{secrets.token_hex(4)}")
        self.deployment = from_proto(deployment_spec("0" * 64))
        runtime = create_runtime("onnx", settings)
        runtime.load(model)
        self.runner = PipelineRunner(self.deployment, [runtime])
        self.limit = kafka.max_record_bytes(settings)
        self.redis = redis.Redis.from_url(args.redis)
        self.notes = AttemptNotes(self.redis, settings.redis_prefix, "profile", 60)
        # Nothing listens on port 9: produce only queues, and each batch's records are purged.
        self.producer = Producer(
            kafka.producer_config(CommonSettings(kafka_bootstrap="127.0.0.1:9"), **{"log_level": 0})
        )
        self.batches = messages(args.batches * args.batch_size, args.batch_size)

    def run(self) -> dict[str, float]:
        """Seconds each stage took over all batches."""
        spent: dict[str, float] = {}

        def timed(stage: str, work: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            result = work()
            spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
            return result

        runner = self.runner
        now = datetime.now(UTC)
        for batch in self.batches:
            sources = timed("ConsumedRecord.of", lambda b=batch: [ConsumedRecord.of(m) for m in b])
            values = [s.value for s in sources]
            rows = timed("decode input", lambda v=values: [records.decode_input(x) for x in v])
            feeds = timed("validate, stack", lambda r=rows, v=values: runner._stack_batch(r, v))  # noqa: SLF001
            ran = timed("model", lambda f=feeds, r=rows: runner._infer(f, r, None))  # noqa: SLF001
            results = timed("results", lambda r=rows, x=ran: runner._successes(r, x, None))  # noqa: SLF001
            timed(
                "output records",
                lambda s=sources, r=results: [
                    produced_records.output_value(self.deployment, x, y, now)
                    for x, y in zip(s, r, strict=True)
                ],
            )
            entries = timed(
                "log entries",
                lambda s=sources, r=results: [
                    produced_records.log_entry(self.deployment, x, y, now) for x, y in zip(s, r, strict=True)
                ],
            )
            timed("log record (Avro)", lambda e=entries: produced_records.log_record(e))
            answered = timed(
                "answer (all records)",
                lambda s=sources, r=results: produced_records.answered(
                    self.deployment, s, r, now, self.limit
                ),
            )
            timed("produce calls", lambda a=answered: self.produce(a))
            self.producer.purge(in_queue=True, in_flight=True)
            self.producer.poll(0)
            timed("attempt notes (Redis)", lambda s=sources: self.note(s))
        return spent

    def produce(self, answered: produced_records.Answered) -> None:
        tracker = kafka.DeliveryTracker()
        for i, reply in enumerate(answered.replies):
            tracker.produce(
                self.producer, reply.topic, reply.value, reply.key, reply.headers, tag=(i, "reply")
            )
        for k, log in enumerate(answered.logs):
            record = log.record
            tracker.produce(
                self.producer, record.topic, record.value, record.key, record.headers, tag=(k, "log")
            )

    def note(self, sources: list[ConsumedRecord]) -> None:
        if not self.notes.tried(sources):
            self.notes.begin(sources, 1)
        self.notes.end(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stages = Stages(args, train_and_export(Path(tmp) / "iris.onnx"))
        stages.run()  # warm-up
        runs = [stages.run() for _ in range(args.repeats)]
    count = args.batches * args.batch_size
    print(f"\nµs per record, batches of {args.batch_size}, median of {args.repeats} runs of {count} records")
    print(f"{'stage':26} {'best':>8} {'median':>8} {'spread':>16}")
    total = 0.0
    for stage in runs[0]:
        per = [run[stage] / count * 1e6 for run in runs]
        median = statistics.median(per)
        if stage != "answer (all records)":
            total += min(per)
        print(f"{stage:26} {min(per):8.2f} {median:8.2f} {min(per):7.2f}-{max(per):<8.2f}")
    print(
        f"{'sum of stages':26} {total:10.2f}  (answer = output records + log entries + log record, not added)"
    )


if __name__ == "__main__":
    main()
