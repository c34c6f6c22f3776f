"""Load generation and measurement shared by every system under test.

The same :class:`Feeder` writes the input records and the same :class:`Collector` reads
the outputs back, whichever system sits between them, so both sides of a comparison are
timed by identical code. Times are ``time.perf_counter()`` of this process; the
``bench-produced-at`` header carries the wall clock (ns) for anyone reading the topics.

For one call at a time, :func:`paced` times any call at a steady rate and :class:`RoundTrip`
is the bare request/reply over Kafka the synchronous doors are compared with.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from joey_core import kafka
from joey_core.kafka import producer_config
from joey_core.records import REQUEST_ID_HEADER, header_value
from joey_core.replies import reply_consumer
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics

log = logging.getLogger(__name__)

PRODUCED_AT_HEADER = "bench-produced-at"


@dataclass
class Load:
    """Records of one measured run: ids and pre-encoded JSON values, so encoding is not timed."""

    ids: list[str]
    values: list[bytes]
    produced_at: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, prefix: str, rows: Sequence[dict[str, object]], count: int) -> Load:
        values = [json.dumps(row).encode() for row in rows]
        return cls(
            [f"{prefix}-{i:07d}" for i in range(count)], [values[i % len(values)] for i in range(count)]
        )


class Feeder:
    """Produces a load to a topic, as fast as possible or at a fixed rate."""

    def __init__(self, settings: CommonSettings) -> None:
        self._producer = Producer(producer_config(settings, **{"linger.ms": 5}))
        self._failures: list[object] = []

    def _send(self, topic: str, load: Load, i: int) -> None:
        rid = load.ids[i]
        headers = [(REQUEST_ID_HEADER, rid.encode()), (PRODUCED_AT_HEADER, str(time.time_ns()).encode())]
        while True:
            try:
                self._producer.produce(
                    topic, load.values[i], rid.encode(), headers=headers, on_delivery=self._check
                )
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.05)
        load.produced_at.append(time.perf_counter())

    def _check(self, err: object, msg: object) -> None:
        if err is not None:
            self._failures.append(err)

    def flood(self, topic: str, load: Load) -> None:
        for i in range(len(load.ids)):
            self._send(topic, load, i)
            if i % 1000 == 999:
                self._producer.poll(0)
        self.flush()

    def paced(self, topic: str, load: Load, rate: float) -> None:
        start = time.perf_counter()
        sent = 0
        while sent < len(load.ids):
            due = min(len(load.ids), int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                self._send(topic, load, sent)
                sent += 1
            self._producer.poll(0)
            time.sleep(0.0005)
        self.flush()

    def close(self) -> None:
        """Flush and destroy the producer now, while the broker is still up."""
        self.flush()
        del self._producer

    def flush(self) -> None:
        if self._producer.flush(60) or self._failures:
            raise RuntimeError(f"input records not acknowledged by the broker: {self._failures[:1]}")


@dataclass
class Collected:
    arrived_at: dict[str, float]
    errors: dict[str, bytes]
    samples: dict[str, bytes]
    output_bytes: int = 0
    """Bytes (value, key, headers) of the outputs counted in ``arrived_at``."""
    log_bytes: int = 0
    """Bytes of the log records keyed by a request id of the run (a log batch is keyed by its first)."""


def record_bytes(message: Any) -> int:
    key, value = message.key() or b"", message.value() or b""
    return len(key) + len(value) + sum(len(k) + len(v or b"") for k, v in message.headers() or ())


class Collector:
    """Reads output (and error) topics by direct assignment, so there is no consumer group to join.

    One instance lives for the whole benchmark and keeps its position; records of earlier runs
    or redeliveries are told apart by request id.
    """

    LOG_QUIET_SECONDS = 1.0
    """After the last output, log records are still counted until none came for this long: a log
    record is produced with its batch's outputs, but may be read back just after them."""

    def __init__(
        self,
        settings: CommonSettings,
        outputs: Iterable[str],
        errors: Iterable[str],
        logs: Iterable[str] = (),
    ) -> None:
        self._errors = set(errors)
        self._logs = set(logs)
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": "joey-bench-collector",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "enable.partition.eof": False,
            }
        )
        names = [*outputs, *self._errors, *self._logs]
        metadata = self._consumer.list_topics(timeout=10)
        missing = [n for n in names if n not in metadata.topics]
        if missing:
            raise RuntimeError(f"output topics missing: {missing}")
        self._consumer.assign(
            [TopicPartition(n, p, OFFSET_BEGINNING) for n in names for p in metadata.topics[n].partitions]
        )

    def collect(
        self,
        expected: set[str],
        timeout: float,
        check: Callable[[], None] = lambda: None,
        keep: frozenset[str] = frozenset(),
    ) -> Collected:
        """Wait until every expected request id has an output or an error; ``check`` raises on a crash."""
        result = Collected({}, {}, {})
        deadline = time.monotonic() + timeout
        next_check = 0.0
        prefix = next(iter(expected)).rsplit("-", 1)[0].encode() + b"-" if expected else b""
        last_log = time.monotonic()

        def done() -> bool:
            answered = len(result.arrived_at) + len(result.errors) >= len(expected)
            return answered and (not self._logs or time.monotonic() - last_log > self.LOG_QUIET_SECONDS)

        while not done():
            clock = time.monotonic()
            if clock > deadline:
                raise TimeoutError(
                    f"collected {len(result.arrived_at)} outputs and {len(result.errors)} errors "
                    f"of {len(expected)} records within {timeout:.0f}s"
                )
            if clock > next_check:
                check()
                next_check = clock + 1.0
            first = self._consumer.poll(0.05)
            if first is None:
                continue
            batch = [first, *self._consumer.consume(10_000, 0)]
            now = time.perf_counter()
            for message in kafka.usable(batch, log):
                if message.topic() in self._logs:
                    if (message.key() or b"").startswith(prefix):
                        result.log_bytes += record_bytes(message)
                        last_log = time.monotonic()
                    continue
                rid = next(
                    (v.decode() for k, v in message.headers() or () if k == REQUEST_ID_HEADER and v), None
                )
                if rid not in expected or rid in result.arrived_at or rid in result.errors:
                    continue
                if message.topic() in self._errors:
                    result.errors[rid] = message.value()
                else:
                    result.arrived_at[rid] = now
                    result.output_bytes += record_bytes(message)
                    if rid in keep:
                        result.samples[rid] = message.value()
        return result

    def close(self) -> None:
        self._consumer.close()


class Background:
    """Runs a collection in a thread while the main thread produces."""

    def __init__(self, target: Callable[[], Collected]) -> None:
        self._target = target
        self._result: Collected | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._target()
        except BaseException as exc:
            self._error = exc

    def result(self) -> Collected:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, over all cores."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS


Roles = dict[str, Callable[[], list[int]]]
"""Named groups of processes whose CPU is sampled: each a function giving the group's pids now."""


class CpuSampler:
    """Samples the cumulative CPU seconds of process groups every ``interval`` s during a run, so
    the CPU spent between two instants (a drain's first and last output) is read by interpolation.

    A group's pids are looked up at each sample (a replica process starts after the run does); its
    figure is the sum over the pids alive then, so a group must not lose a process within the span.
    """

    MACHINE = "machine"

    def __init__(self, roles: Roles, interval: float = 0.05) -> None:
        self._roles = roles
        self._interval = interval
        self._times: list[float] = []
        self._values: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values = {name: sum(map(cpu_seconds, pids())) for name, pids in self._roles.items()}
        values[self.MACHINE] = machine_busy_seconds()
        self._times.append(time.perf_counter())
        self._values.append(values)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                self._sample()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _at(self, t: float, role: str) -> float:
        i = min(max(bisect.bisect_left(self._times, t), 1), len(self._times) - 1)
        t0, t1 = self._times[i - 1], self._times[i]
        v0, v1 = self._values[i - 1].get(role, 0.0), self._values[i].get(role, 0.0)
        return v0 + (v1 - v0) * (min(max(t, t0), t1) - t0) / (t1 - t0)

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds of each group (and of the machine) from ``start`` to ``end`` (perf_counter)."""
        return {role: self._at(end, role) - self._at(start, role) for role in self._values[-1]}


@dataclass(frozen=True)
class Sample:
    """One measured run."""

    throughput: float
    """Records per second."""
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU µs per record of each sampled process group (and ``machine``: all cores) over the span."""
    output_bytes: float = math.nan
    """Bytes per output record."""
    log_bytes: float = math.nan
    """Log bytes per input."""


def latencies_ms(load: Load, collected: Collected) -> np.ndarray:
    return np.array(
        [(collected.arrived_at[rid] - t) * 1000 for rid, t in zip(load.ids, load.produced_at, strict=True)]
    )


def live_sample(load: Load, collected: Collected) -> Sample:
    """Records were produced while the system ran: throughput from the first produce to the last output."""
    lat = latencies_ms(load, collected)
    span = max(collected.arrived_at.values()) - load.produced_at[0]
    return Sample(len(load.ids) / span, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))


def drain_sample(load: Load, collected: Collected, cpu: CpuSampler | None = None) -> Sample:
    """Records were waiting before the system started: throughput from the first output to the last.

    Latency here is dominated by the time the records waited for the system to start, so
    only throughput is meaningful. With ``cpu``, each group's CPU over that span per record.
    """
    arrivals = collected.arrived_at.values()
    start, end = min(arrivals), max(arrivals)
    span = end - start
    count = len(load.ids)
    spent = cpu.between(start, end) if cpu is not None else {}
    return Sample(
        count / span if span > 0 else float("inf"),
        float("nan"),
        float("nan"),
        {role: seconds * 1e6 / count for role, seconds in spent.items()},
        collected.output_bytes / max(len(collected.arrived_at), 1),
        collected.log_bytes / count,
    )


def median(samples: Sequence[Sample]) -> Sample:
    numbers = {
        f.name: statistics.median(getattr(s, f.name) for s in samples)
        for f in dataclasses.fields(Sample)
        if f.name != "cpu_us"
    }
    roles = {role for s in samples for role in s.cpu_us}
    cpu = {role: statistics.median(s.cpu_us.get(role, math.nan) for s in samples) for role in roles}
    return Sample(cpu_us=cpu, **numbers)


def log_record(workspace: str, pipeline: str, offset: int, at: datetime, inputs: str) -> dict[str, Any]:
    """A decoded joey.v1.InferenceLog of an iris-like model, as the engine writes and the logger
    hands to its sink; ``offset`` makes its identity unique."""
    return {
        "workspace": workspace,
        "pipeline": pipeline,
        "pipeline_version": 1,
        "deployment_id": "bench-1",
        "request_id": f"req-{offset:09d}",
        "record_key": f"key-{offset}".encode(),
        "time": at,
        "input_topic": f"joey.{workspace}.{pipeline}.inputs",
        "input_partition": 0,
        "input_offset": offset,
        "ok": True,
        "error": None,
        "inputs": inputs,
        "raw_input": None,
        "outputs": f'{{"label": [{offset % 3}]}}',
        "shadow_outputs": None,
        "check_failures": [],
        "models": [{"name": "iris", "version": 1, "sha256": "ab" * 32}],
        "elapsed_ns": [1200],
    }


def paced(call: Callable[[], object], rate: float, seconds: float) -> tuple[list[float], float]:
    """Latencies (ms) of calls made one at a time every 1/rate s for ``seconds``, and the achieved rate.

    A call slower than the interval delays the next one, so the rate is a ceiling."""
    interval = 1.0 / rate
    latencies = []
    start = next_at = time.perf_counter()
    while next_at - start < seconds:
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        began = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - began) * 1000)
        next_at = max(next_at + interval, time.perf_counter())
    return latencies, len(latencies) / (time.perf_counter() - start)


class RoundTrip:
    """One record produced to ``target``, then read back from ``topics``' outputs by its request id.

    The clients are the ones Joey's synchronous doors use: the gateway's producer (Joey's producer
    settings, no linger) and the assign-only reply reader of ``joey_core.replies``. With ``target``
    the outputs topic itself this is the bare broker hop; with a process answering in between, the
    request/reply floor for that process.
    """

    def __init__(self, settings: CommonSettings, topics: PipelineTopics, target: str, value: bytes) -> None:
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self._replies = reply_consumer(settings, topics)
        self._target = target
        self._value = value
        self._sent = 0

    def __call__(self) -> None:
        self._sent += 1
        rid = f"bench-rt-{self._sent}".encode()
        self._producer.produce(self._target, self._value, rid, headers=[(REQUEST_ID_HEADER, rid)])
        self._producer.poll(0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # Waiting with poll, never consume(timeout): consume waits out its timeout unless its batch fills.
            message = self._replies.poll(0.1)
            if message is None or not kafka.usable([message], log):
                continue
            if header_value(message.headers(), REQUEST_ID_HEADER) == rid.decode():  # type: ignore[arg-type]
                return
        raise TimeoutError(f"no reply to {rid.decode()} on {self._target} within 30 s")

    def close(self) -> None:
        self._producer.flush(10)
        self._replies.close()
