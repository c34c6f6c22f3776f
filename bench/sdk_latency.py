"""Latency of the SDK's `pipeline.infer` of one row against a bare broker round trip, and the SDK's bulk
rate against the engine's drain, in one run.

Single row, one call at a time, the systems taking turns repetition by repetition:

* broker: produce one record to a topic and read it back (a long-lived producer and assign-only
  consumer): the floor of any trip through Kafka on this machine
* sdk: `pipeline.infer([row])` on one long-lived `joey.Client` (its stream and status cache warm)
* sdk-new-client: the same on a new `joey.Client` per call, closed after it: a status call, a new reply
  reader (watermarks, assign) and a new producer per call, which is what every call cost before the
  client kept its stream

Bulk, ``--bulk`` rows of iris features as a DataFrame:

* engine: the same records produced by a plain producer, timed until every reply is read back
* sdk: `pipeline.infer(frame)`, with the growth of the process's resident memory during the call (its
  peak, sampled every 20 ms) set beside the size of the input frame and of the result frame (which the
  call returns, so it holds them)

    python bench/sdk_latency.py --calls 200 --repeats 3 --bulk 100000
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from confluent_kafka import Producer

from joey.client import Client, Pipeline
from joey_cli.broker import EmbeddedBroker
from joey_core import kafka, records, topics
from joey_core.replies import Call, ReplyReader
from joey_core.settings import CommonSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_throughput import (  # noqa: E402
    REDIS_URL,
    Process,
    admin_token,
    free_port,
    interrupt,
    registry_ready,
    scratch_database,
    scratch_redis_prefix,
    stack_secrets,
    wait_until,
)
from measure import RoundTrip  # noqa: E402

from train_model import make_records, train_and_export  # noqa: E402

PIPELINE = "bench-sdk"
WORKSPACE = "default"
WARMUP_CALLS = 20


def timed(call: Callable[[], object], calls: int) -> list[float]:
    latencies = []
    for _ in range(calls):
        began = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def round_trip(settings: CommonSettings) -> RoundTrip:
    """The bare broker hop: one record produced to a topic and read back, by clients that stay open."""
    names = topics.PipelineTopics("bench.rtt.in", "bench.rtt", "bench.rtt.errors")
    kafka.ensure_topics(kafka.admin_client(settings), [kafka.TopicSpec(t, 1) for t in names.all()])
    return RoundTrip(settings, names, names.outputs, b'{"out": {}}')


def engine_drain(settings: CommonSettings, rows: list[dict[str, list[float]]]) -> float:
    """Records/s of the engine: ``rows`` produced by a plain producer, until every reply is read back."""
    names = topics.pipeline_topics(WORKSPACE, PIPELINE)
    reader = ReplyReader(settings, names)
    try:
        call = Call([uuid.uuid4().hex for _ in rows])
        reader.expect(call)
        producer = Producer(kafka.producer_config(settings))
        began = time.perf_counter()
        for request_id, row in zip(call.request_ids, rows, strict=True):
            key = request_id.encode()
            while True:
                try:
                    producer.produce(
                        names.inputs, records.dumps(row), key, headers=[(records.REQUEST_ID_HEADER, key)]
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)
        if not call.done.wait(600):
            raise TimeoutError(f"{len(call.replies)} of {len(rows)} records answered in 600 s")
        return len(rows) / (time.perf_counter() - began)
    finally:
        reader.close()


def percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(latencies, [50, 99])
    return float(p50), float(p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="single-row calls per system and repetition")
    parser.add_argument("--cold-calls", type=int, default=20, help="calls of sdk-new-client per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bulk", type=int, default=100_000, help="rows of the bulk run (0: none)")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-bench-")))
        logs = work / "logs"
        logs.mkdir()
        broker = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log"))
        env = {
            "JOEY_KAFKA_BOOTSTRAP": broker.bootstrap,
            "JOEY_DATABASE_URL": stack.enter_context(scratch_database()),
            "JOEY_REDIS_URL": REDIS_URL,
            "JOEY_REDIS_PREFIX": stack.enter_context(scratch_redis_prefix()),
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_ARTIFACT_DIR": str(work / "artifacts"),
            "JOEY_CACHE_DIR": str(work / "cache"),
            "JOEY_PIPELINE_PARTITIONS": str(args.partitions),
            "JOEY_LOGS_PARTITIONS": str(args.partitions),
            **stack_secrets(),
        }
        settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in env.items()})

        def serve(name: str) -> Process:
            process = Process(name, [sys.executable, "-m", "joey_cli", "serve", name], env, logs).start()
            stack.callback(process.stop)
            return process

        registry = serve("registry")
        wait_until(lambda: registry.check() or registry_ready(settings.registry_addr), 60, "the registry")
        engine = serve("engine")
        token = admin_token(settings.registry_addr, env["JOEY_ADMIN_PASSWORD"])
        client = Client(settings=settings, token=token)
        stack.callback(client.close)
        model_path = train_and_export(work / "iris.onnx")
        pipeline = client.build_pipeline(PIPELINE).add_model_step(client.upload_model("iris", model_path))
        pipeline.deploy(replicas=1, timeout=120)
        row = make_records(1, seed=1)
        broker_hop = round_trip(settings)
        stack.callback(broker_hop.close)

        def cold() -> None:
            with Client(settings=settings, token=token) as fresh:
                fresh.get_pipeline(PIPELINE).infer(row)

        systems: dict[str, tuple[Callable[[], object], int]] = {
            "broker": (broker_hop, args.calls),
            "sdk": (lambda: pipeline.infer(row), args.calls),
            "sdk-new-client": (cold, args.cold_calls),
        }
        for call, _ in systems.values():
            timed(call, WARMUP_CALLS // 4)
        results: dict[str, list[float]] = {name: [] for name in systems}
        for rep in range(1, args.repeats + 1):
            for name, (call, calls) in systems.items():
                latencies = timed(call, calls)
                results[name] += latencies
                p50, p99 = percentiles(latencies)
                print(f"  rep {rep} {name:15} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms", flush=True)
            engine.check()
        print("\nsingle row, one call at a time")
        base50, base99 = percentiles(results["broker"])
        header = f"{'system':16}{'calls':>7}{'p50 ms':>10}{'p99 ms':>10}{'p50/broker':>12}{'p99/broker':>12}"
        print(header)
        print("-" * len(header))
        for name, latencies in results.items():
            p50, p99 = percentiles(latencies)
            ratios = f"{p50 / base50:>12.1f}{p99 / base99:>12.1f}"
            print(f"{name:16}{len(latencies):>7}{p50:>10.2f}{p99:>10.2f}{ratios}")

        if args.bulk:
            bulk(settings, pipeline, args.bulk)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The process's peak resident memory while the block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bulk(settings: CommonSettings, pipeline: Pipeline, rows: int) -> None:
    values = np.random.default_rng(2).normal(5, 1, (rows, 4)).round(3)
    frame = pd.DataFrame(values, columns=["a", "b", "c", "d"])
    engine_rate = engine_drain(settings, [{"features": v} for v in values.tolist()])
    gc.collect()
    with PeakRss() as rss:
        began = time.perf_counter()
        result = pipeline.infer(frame, timeout=600)
        sdk_rate = rows / (time.perf_counter() - began)
    failed = int(result["error"].notna().sum())
    result_bytes = int(result.memory_usage(deep=True).sum())
    input_mib = frame.memory_usage(deep=True).sum() / 2**20
    grown = (rss.peak - rss.before) / 2**20
    print(f"\nbulk: {rows} rows as a DataFrame of 4 feature columns ({failed} failed)")
    print(f"{'engine drain':22}{engine_rate:>12.0f} records/s")
    print(f"{'sdk pipeline.infer':22}{sdk_rate:>12.0f} records/s  ({sdk_rate / engine_rate:.2f}x the engine)")
    print(
        f"{'peak RSS growth':22}{grown:>12.1f} MiB  (input frame {input_mib:.1f} MiB, "
        f"result frame {result_bytes / 2**20:.1f} MiB; {grown * 2**20 / rows:.0f} bytes a row)"
    )
    assert len(result) == rows


if __name__ == "__main__":
    main()
