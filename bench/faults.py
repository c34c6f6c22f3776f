"""The fault suite: is anything lost, or logged twice, while parts of Joey fail? (`make faults`)

It starts a private stack: a Postgres cluster and a Redis server of its own (bench/private_stores.py;
the machine's shared ones are never touched), the embedded broker, and every Joey service (registry,
engine, logger, assayer, gateway) as a process of its own, which it kill -9s and starts again; like
`joey up`, it also restarts a service that exits by itself, and counts it. It deploys a pipeline of a
shadow step (the forest answers, the logistic regression shadows it) and a python step
(examples/steps/iris_postprocess.py), with a live assay on petal length, and streams ``--rate`` records/s
into its inputs topic, each with a unique key and ``request-id``, and calls the gateway's REST endpoint
beside it (``--gateway-rate`` calls/s of two rows). Meanwhile it applies one fault after another, each
in a phase of its own: a quiet lead, the fault, then until the stack has recovered (every service
ready, the records sent before the fault's end answered and logged, a record sent after it answered)
or ``--recover-s`` passed.

Counted per phase, by record key (the outputs and errors topics and the log rows carry the input's
key): records the broker acknowledged (sent), answered on the outputs or errors topic, logged in
``inference_logs``, duplicated log rows, lost (neither answered nor logged once the run settled),
outputs seen more than once (at-least-once allows them), the longest gap between answers, and the
times from the fault's end to the first answer of a record sent since the fault began, to the last
answer and to the last log row of the records sent before its end. The table is printed in Markdown;
the exit status is 1 when any record was lost or any log row duplicated.

    python bench/faults.py                      # every fault, about 10 minutes
    python bench/faults.py --quick              # a smoke run of four faults
    python bench/faults.py --faults kill-engine,deep-nesting --keep-logs /tmp/fault-logs
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from joey.client import Client
from joey_cli.broker import EmbeddedBroker
from joey_cli.services import SERVICES, module
from joey_cli.stack import service_env
from joey_core import db, heartbeats, kafka, topics
from joey_core.records import REQUEST_ID_HEADER
from joey_core.settings import CommonSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from engine_throughput import admin_token, interrupt, registry_ready, stack_secrets  # noqa: E402
from private_stores import PrivatePostgres, PrivateRedis, free_port  # noqa: E402

from train_model import make_records, train_and_export  # noqa: E402

WORKSPACE = "default"
PIPELINE = "faults"
ASSAY = "faults-petal-length"
REDIS_PREFIX = "joey"
DEEP_NESTING = 50_000
OVERSIZED_FLOATS = 300_000
"""About 1.5 MB of JSON: above real Kafka's default 1 MiB message limit, below the embedded broker's 5 MiB."""
LONG_REQUEST_ID = 3072
HOSTILE_PER_PHASE = 5
FEEDER_MAX_MESSAGE = 8 * 1024 * 1024

log = logging.getLogger("faults")


def now() -> float:
    """Wall-clock time: comparable with Postgres's ``logged_at`` on the same machine."""
    return time.time()


# ----------------------------------------------------------------------------------------------- stack


class Service:
    """One `python -m joey_<name>` process; each start has an instance id of its own, so readiness means
    this start's heartbeat, never the one a killed process left in Redis."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unplanned_exits = 0

    @property
    def instance_id(self) -> str:
        return f"{self.name}-faults-{self.starts}"

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", module(self.name)],
                env=self.env | {"JOEY_INSTANCE_ID": self.instance_id},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Stack:
    """The private stack and the supervision `joey up` would give it: an exited service is restarted."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.postgres = PrivatePostgres(work / "postgres", self.logs / "pg_ctl.log")
        self.redis = PrivateRedis(self.logs / "redis.log")
        self.broker = EmbeddedBroker(free_port(), self.logs / "broker.log")
        self.database_url = self.postgres.url("joey")
        self.secrets = stack_secrets()
        self.env = {
            "JOEY_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "JOEY_DATABASE_URL": self.database_url,
            "JOEY_REDIS_URL": self.redis.url,
            "JOEY_REDIS_PREFIX": REDIS_PREFIX,
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_ARTIFACT_DIR": str(work / "artifacts"),
            "JOEY_CACHE_DIR": str(work / "cache"),
            "JOEY_PIPELINE_PARTITIONS": str(args.partitions),
            "JOEY_LOGS_PARTITIONS": str(args.partitions),
            # Assay windows close within the run: the assayer waits 5 s for late records, not a minute.
            "JOEY_ALLOWED_LATENESS_S": "5",
        }
        self.settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in self.env.items()})
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("JOEY_")}
        self.engine_metrics = f"http://127.0.0.1:{free_port()}/metrics"
        engine = {
            "JOEY_SERVICE_TOKEN": self.secrets["JOEY_SERVICE_TOKEN"],
            "JOEY_METRICS_PORT": self.engine_metrics.rsplit(":", 1)[1].split("/")[0],
        }
        own = {"registry": self.secrets, "engine": engine}
        self.services = {
            name: Service(
                name,
                service_env(inherited | self.env, name) | own.get(name, {}),
                self.logs / f"{name}.log",
            )
            for name in SERVICES
        }
        self._supervising = threading.Lock()
        """Held while a service is checked or restarted: a planned kill is never taken for a crash."""
        self._stopped = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def start(self, stack: ExitStack) -> None:
        self.postgres.init()
        stack.callback(self.postgres.stop)
        self.redis.start()
        stack.callback(self.redis.stop)
        self.broker.start()
        stack.callback(self.broker.stop)
        stack.callback(self.resume_broker)  # runs first: a stopped broker cannot be stopped
        db.prepare(self.database_url)
        kafka.ensure_topics(kafka.admin_client(self.settings), kafka.platform_topics(self.settings))
        registry = self.services["registry"]
        registry.start()
        stack.callback(self.stop_services)
        wait_until(lambda: self.ready("registry", starting=True), 90, "the registry")
        for name, service in self.services.items():
            if name != "registry":
                service.start()
        wait_until(
            lambda: all(self.ready(name, starting=True) for name in self.services), 90, "every service"
        )
        self._supervisor.start()

    def ready(self, name: str, starting: bool = False) -> bool:
        service = self.services[name]
        if service.exited():
            if starting:
                raise RuntimeError(f"{name} exited while starting; see {service.log_path}")
            return False  # the supervisor restarts it
        if name == "registry":
            return registry_ready(self.env["JOEY_REGISTRY_ADDR"])
        try:
            client = redis.Redis.from_url(self.redis.url, socket_timeout=1)
            return service.instance_id in heartbeats.live_services(client, REDIS_PREFIX, name)
        except redis.RedisError:
            return False

    def healthy(self) -> bool:
        return all(self.ready(name) for name in self.services)

    def _supervise(self) -> None:
        while not self._stopped.wait(0.5):
            with self._supervising:
                for service in self.services.values():
                    if service.exited():
                        service.unplanned_exits += 1
                        code = service.process.returncode if service.process else None
                        print(f"  ! {service.name} exited by itself (code {code}); restarting it", flush=True)
                        service.start()

    def kill_and_restart(self, name: str) -> None:
        with self._supervising:  # this exit is the fault, not a crash
            self.services[name].kill9()
            self.services[name].start()

    def replica_failures(self) -> float:
        """The engine's count of replicas stopped by a fatal error, since it started (0 when unreachable)."""
        try:
            text = requests.get(self.engine_metrics, timeout=5).text
        except requests.RequestException:
            return 0.0
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "joey_engine_replica_failures_total"
        )

    def resume_broker(self) -> None:
        if self.broker.process is not None and self.broker.process.poll() is None:
            self.broker.process.send_signal(signal.SIGCONT)

    def stop_services(self) -> None:
        self._stopped.set()
        with self._supervising:
            for service in reversed(self.services.values()):
                service.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- traffic


@dataclass
class Phase:
    name: str
    tag: str
    start: float = 0.0
    fault_start: float = 0.0
    fault_end: float = 0.0
    end: float = 0.0
    recovered: bool = False
    unplanned_exits: int = 0
    replica_failures: float = 0.0
    hostile: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Feeder(threading.Thread):
    """Writes ``rate`` records/s to the inputs topic, and the hostile records it is handed between them.

    A record counts as sent once the broker acknowledged it (its delivery report)."""

    def __init__(self, settings: CommonSettings, topic: str, rows: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.topic = topic
        self.rows = rows
        self.rate = rate
        self.producer = Producer(
            kafka.producer_config(settings, **{"linger.ms": 5, "message.max.bytes": FEEDER_MAX_MESSAGE})
        )
        self.phase: Phase | None = None
        self.lock = threading.Lock()
        self.produced: dict[str, tuple[str, float]] = {}
        """key -> (phase name, when produced)"""
        self.acked: set[str] = set()
        self.failed: dict[str, str] = {}
        self.injected: collections.deque[tuple[str, bytes, bytes]] = collections.deque()
        self.stopping = threading.Event()

    def inject(self, key: str, value: bytes, request_id: bytes) -> None:
        self.injected.append((key, value, request_id))

    def _delivered(self, err: Any, msg: Any) -> None:
        key = msg.key().decode()
        with self.lock:
            if err is None:
                self.acked.add(key)
            else:
                self.failed[key] = str(err)

    def _send(self, key: str, value: bytes, request_id: bytes) -> None:
        assert self.phase is not None
        with self.lock:
            self.produced[key] = (self.phase.name, now())
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value,
                    key.encode(),
                    headers=[(REQUEST_ID_HEADER, request_id)],
                    on_delivery=self._delivered,
                )
                return
            except BufferError:  # the local queue is full (the broker is paused): let it drain
                self.producer.poll(0.05)

    def run(self) -> None:
        start, sent = time.monotonic(), 0
        while not self.stopping.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while sent < due:
                assert self.phase is not None
                key = f"{self.phase.tag}-{sent:07d}"
                self._send(key, self.rows[sent % len(self.rows)], key.encode())
                sent += 1
            while self.injected:
                self._send(*self.injected.popleft())
            self.producer.poll(0.005)
        self.producer.flush(60)
        del self.producer  # now, while the broker is up: a live producer would reconnect as it stops

    def settled(self, keys: list[str]) -> bool:
        """Whether the broker acknowledged or refused each of ``keys``."""
        with self.lock:
            return all(k in self.acked or k in self.failed for k in keys)


class GatewayCaller(threading.Thread):
    """Calls the gateway's REST inference endpoint, two rows a call, one call at a time."""

    def __init__(self, url: str, token: str, rows: list[list[float]], rate: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.headers = {"authorization": f"Bearer {token}"}
        self.rows = rows
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.phase: Phase | None = None
        self.calls: list[tuple[str, float, str]] = []
        self.examples: dict[tuple[str, str], str] = {}
        """(phase name, outcome) -> the first answer of that kind, shortened"""
        """(phase name, when sent, outcome: ok, HTTP <status>, no answer in 15 s, or unreachable)"""
        self.stopping = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        i = 0
        while not self.stopping.wait(self.interval):
            assert self.phase is not None
            data = [*self.rows[i % len(self.rows)], *self.rows[(i + 1) % len(self.rows)]]
            body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": data}]}
            sent = now()
            try:
                response = session.post(self.url, json=body, headers=self.headers, timeout=15)
                outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                # An HTML error page (the standard library's) shortened to its words.
                example = " ".join(re.sub(r"<[^>]*>", " ", response.text).split())[:160]
            except requests.Timeout:
                outcome, example = "no answer in 15 s", ""
            except requests.RequestException as exc:
                outcome, example = "unreachable", type(exc).__name__
            self.examples.setdefault((self.phase.name, outcome), example)
            self.calls.append((self.phase.name, sent, outcome))
            i += 2


class Collector(threading.Thread):
    """Reads the pipeline's outputs and errors topics and the logger's dead letters by assignment.

    Commit policy: none; the collector is assign-only and reads every partition from the beginning."""

    def __init__(self, settings: CommonSettings, names: topics.PipelineTopics) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(
            kafka.consumer_config(settings, "joey-faults-collector", **{"fetch.wait.max.ms": 10})
        )
        self.errors_topic = names.errors
        wanted = [names.outputs, names.errors, topics.LOGS_DEAD_LETTER]
        metadata = self.consumer.list_topics(timeout=10)
        self.consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in wanted for p in metadata.topics[t].partitions]
        )
        self.lock = threading.Lock()
        self.first: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.seen: collections.Counter[str] = collections.Counter()
        self.arrivals: list[float] = []
        self.dead_letters = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            batch = self.consumer.consume(1000, 0.1)
            at = now()
            with self.lock:
                for message in kafka.usable(batch, log):
                    if message.topic() == topics.LOGS_DEAD_LETTER:
                        self.dead_letters += 1
                        continue
                    key = (message.key() or b"").decode(errors="replace")
                    self.seen[key] += 1
                    self.arrivals.append(at)
                    if key in self.first:
                        continue
                    self.first[key] = at
                    if message.topic() == self.errors_topic:
                        self.errors[key] = _reason(message.value())
        self.consumer.close()


def _reason(value: bytes | None) -> str:
    try:
        return str(json.loads(value or b"{}").get("error", ""))[:160]
    except ValueError:
        return f"<undecodable error record of {len(value or b'')} bytes>"


class LogTable:
    """The pipeline's rows in the private Postgres, by record key."""

    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        """key -> (rows, latest logged_at) of the keys starting with ``prefix``; empty when unreachable."""
        query = (
            "SELECT record_key, count(*), extract(epoch FROM max(logged_at)) FROM inference_logs "
            "WHERE workspace = %s AND pipeline = %s AND substring(record_key FROM 1 FOR %s) = %s "
            "GROUP BY record_key"
        )
        try:
            with psycopg.connect(self.url, connect_timeout=3) as conn:
                found = conn.execute(query, (WORKSPACE, PIPELINE, len(prefix), prefix.encode())).fetchall()
        except psycopg.OperationalError:
            return {}
        return {bytes(k or b"").decode(errors="replace"): (n, float(t)) for k, n, t in found}


# --------------------------------------------------------------------------------------------- faults


@dataclass
class Context:
    stack: Stack
    feeder: Feeder
    args: argparse.Namespace
    good_row: bytes


def kill(name: str) -> Callable[[Context, Phase], None]:
    def apply(ctx: Context, phase: Phase) -> None:
        ctx.stack.kill_and_restart(name)

    return apply


def restart_postgres(ctx: Context, phase: Phase) -> None:
    ctx.stack.postgres.crash()
    time.sleep(ctx.args.down_s)  # the outage itself
    ctx.stack.postgres.start()


def restart_redis(ctx: Context, phase: Phase) -> None:
    ctx.stack.redis.kill()
    time.sleep(ctx.args.down_s)
    ctx.stack.redis.start()


def pause_broker(ctx: Context, phase: Phase) -> None:
    process = ctx.stack.broker.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(ctx.args.pause_s)
    finally:
        process.send_signal(signal.SIGCONT)


def hostile(make: Callable[[Context, str], tuple[bytes, bytes]]) -> Callable[[Context, Phase], None]:
    """Inject HOSTILE_PER_PHASE records among the stream's; the fault ends when the broker has them."""

    def apply(ctx: Context, phase: Phase) -> None:
        for i in range(HOSTILE_PER_PHASE):
            key = f"{phase.tag}-hostile-{i}"
            value, request_id = make(ctx, key)
            phase.hostile.append(key)
            ctx.feeder.inject(key, value, request_id)
            time.sleep(0.2)  # spread among the good records
        try:
            wait_until(lambda: ctx.feeder.settled(phase.hostile), 60, "the broker's acks")
        except TimeoutError as exc:
            phase.notes.append(f"hostile records: {exc}")

    return apply


def deep_nesting(ctx: Context, key: str) -> tuple[bytes, bytes]:
    return b'{"features": ' + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING + b"}", key.encode()


def oversized(ctx: Context, key: str) -> tuple[bytes, bytes]:
    return json.dumps({"features": [0.5] * OVERSIZED_FLOATS}).encode(), key.encode()


def non_utf8_request_id(ctx: Context, key: str) -> tuple[bytes, bytes]:
    return ctx.good_row, b"\xff\xfe" + key.encode() + b"\x80"


def long_request_id(ctx: Context, key: str) -> tuple[bytes, bytes]:
    # Random, so that Postgres cannot compress the index entry below its limit (a run of one letter fits).
    return ctx.good_row, f"{key}-{secrets.token_urlsafe(LONG_REQUEST_ID)}"[:LONG_REQUEST_ID].encode()


def nothing(ctx: Context, phase: Phase) -> None:
    """The control phase: the same stream with no fault, for the stall and timing figures of calm."""


FAULTS: dict[str, Callable[[Context, Phase], None]] = {
    "none": nothing,
    **{f"kill-{name}": kill(name) for name in ("engine", "logger", "assayer", "gateway", "registry")},
    "restart-postgres": restart_postgres,
    "restart-redis": restart_redis,
    "pause-broker": pause_broker,
    "deep-nesting": hostile(deep_nesting),
    "oversized": hostile(oversized),
    "non-utf8-request-id": hostile(non_utf8_request_id),
    "long-request-id": hostile(long_request_id),
}
QUICK = ("none", "kill-engine", "restart-postgres", "pause-broker", "deep-nesting")


# ------------------------------------------------------------------------------------------ the run


class Run:
    def __init__(self, ctx: Context, collector: Collector, gateway: GatewayCaller, table: LogTable) -> None:
        self.ctx = ctx
        self.collector = collector
        self.gateway = gateway
        self.table = table
        self.phases: list[Phase] = []

    def keys(self, phase: Phase, before: float | None = None, since: float | None = None) -> list[str]:
        feeder = self.ctx.feeder
        with feeder.lock:
            return [
                key
                for key, (name, at) in feeder.produced.items()
                if name == phase.name
                and key in feeder.acked
                and (before is None or at < before)
                and (since is None or at >= since)
            ]

    def recovered(self, phase: Phase) -> bool:
        if not self.ctx.stack.healthy():
            return False
        with self.collector.lock:
            answered = set(self.collector.first)
        if not any(k in answered for k in self.keys(phase, since=phase.fault_end)):
            return False
        backlog = self.keys(phase, before=phase.fault_end)
        if any(k not in answered for k in backlog):
            return False
        if self.gateway.is_alive() and not any(
            name == phase.name and sent >= phase.fault_end and outcome == "ok"
            for name, sent, outcome in list(self.gateway.calls)
        ):
            return False
        logged = self.table.rows(phase.tag)
        return all(k in logged for k in backlog)

    def phase(self, index: int, name: str) -> Phase:
        args = self.ctx.args
        phase = Phase(name, f"{self.ctx.args.run_id}-{index:02d}", start=now())
        stack = self.ctx.stack
        exits_before = sum(s.unplanned_exits for s in stack.services.values())
        engine_starts, failures_before = stack.services["engine"].starts, stack.replica_failures()
        self.ctx.feeder.phase = self.gateway.phase = phase
        self.phases.append(phase)
        print(f"{datetime.now(UTC):%H:%M:%S} {name}", flush=True)
        time.sleep(args.lead_s)  # the steady stream before the fault
        phase.fault_start = now()
        try:
            FAULTS[name](self.ctx, phase)
        except Exception as exc:  # reported in the table; the run goes on with the next fault
            phase.notes.append(f"the fault failed: {exc!r}")
        phase.fault_end = now()
        deadline = time.monotonic() + args.recover_s
        while not self.recovered(phase) and time.monotonic() < deadline:
            time.sleep(0.5)
        phase.recovered = self.recovered(phase)
        if not phase.recovered:
            print(f"  ! not recovered within {args.recover_s:.0f}s", flush=True)
        time.sleep(args.tail_s)
        phase.end = now()
        phase.unplanned_exits = sum(s.unplanned_exits for s in stack.services.values()) - exits_before
        # A restarted engine counts from 0 again.
        restarted = stack.services["engine"].starts != engine_starts
        phase.replica_failures = stack.replica_failures() - (0.0 if restarted else failures_before)
        return phase

    def settle(self) -> None:
        """Stop the traffic; wait until every record is answered and logged, or nothing moves for a while."""
        self.ctx.feeder.stopping.set()
        self.gateway.stopping.set()
        self.ctx.feeder.join()
        self.gateway.join()
        prefix = self.ctx.args.run_id
        last, still = -1, time.monotonic()
        while time.monotonic() - still < self.ctx.args.settle_s:
            with self.ctx.feeder.lock:
                acked = set(self.ctx.feeder.acked)
            with self.collector.lock:
                answered = set(self.collector.first)
            logged = self.table.rows(prefix)
            missing = sum(1 for k in acked if k not in answered or k not in logged)
            if missing == 0:
                return
            if missing != last:
                last, still = missing, time.monotonic()
            time.sleep(1.0)
        print(f"  settled with {last} records not yet both answered and logged", flush=True)


@dataclass
class Row:
    phase: Phase
    sent: int
    answered: int
    errors: int
    logged: int
    duplicated: int
    lost: int
    unlogged: int
    unanswered: int
    dup_outputs: int
    stall: float
    first_answer: float | None
    drained: float | None
    logs_drained: float | None
    gateway: str
    notes: list[str]


def last_after(times: list[float | None], end: float) -> float | None:
    """Seconds from ``end`` to the latest of ``times`` (0 when all came before); None when one never came."""
    if any(t is None for t in times):
        return None
    return max(0.0, max((t for t in times if t is not None), default=end) - end)


def figures(run: Run) -> list[Row]:
    collector = run.collector
    logged = run.table.rows(run.ctx.args.run_id)
    with collector.lock:
        first, errors, seen = dict(collector.first), dict(collector.errors), collector.seen.copy()
        arrivals = sorted(collector.arrivals)
    rows = []
    for phase in run.phases:
        keys = run.keys(phase)
        answered = [k for k in keys if k in first]
        logged_keys = [k for k in keys if k in logged]
        lost = [k for k in keys if k not in first and k not in logged]
        window = [phase.start, *(t for t in arrivals if phase.start <= t <= phase.end), phase.end]
        stall = max(b - a for a, b in zip(window, window[1:], strict=False))
        since = [first[k] for k in run.keys(phase, since=phase.fault_start) if k in first]
        backlog = run.keys(phase, before=phase.fault_end)

        calls = [outcome for name, _, outcome in run.gateway.calls if name == phase.name]
        notes = list(phase.notes)
        if phase.hostile:
            failed = [k for k in phase.hostile if k in errors]
            example = f" (e.g. {errors[failed[0]]!r})" if failed else ""
            answered_ok = sum(1 for k in phase.hostile if k in first and k not in errors)
            unanswered = sum(1 for k in phase.hostile if k not in first)
            notes.append(
                f"of {len(phase.hostile)} hostile records, {len(failed)} on the errors topic{example}, "
                f"{answered_ok} answered on the outputs topic, {unanswered} unanswered"
            )
        unlogged = [k for k in answered if k not in logged]
        unanswered = [k for k in logged_keys if k not in first]
        if unanswered:
            notes.append(f"{len(unanswered)} logged but not answered (e.g. {unanswered[0]})")
        if lost:
            notes.append(f"lost e.g. {lost[0]}")
        good_errors = [k for k in keys if k in errors and k not in phase.hostile]
        if good_errors:
            notes.append(f"{len(good_errors)} good records failed, e.g. {errors[good_errors[0]]!r}")
        refused = collections.Counter(o for o in calls if o != "ok")
        if refused:
            notes.append(
                "gateway "
                + ", ".join(
                    f"{n}x {o} ({run.gateway.examples.get((phase.name, o), '')!r})"
                    for o, n in refused.most_common()
                )
            )
        if not phase.recovered:
            notes.append(f"not recovered within {run.ctx.args.recover_s:.0f}s")
        rows.append(
            Row(
                phase,
                sent=len(keys),
                answered=len(answered),
                errors=sum(1 for k in keys if k in errors),
                logged=len(logged_keys),
                duplicated=sum(logged[k][0] - 1 for k in logged_keys),
                lost=len(lost),
                unlogged=len(unlogged),
                unanswered=len(unanswered),
                dup_outputs=sum(1 for k in answered if seen[k] > 1),
                stall=stall,
                first_answer=max(0.0, min(since) - phase.fault_end) if since else None,
                drained=last_after([first.get(k) for k in backlog], phase.fault_end),
                logs_drained=last_after(
                    [logged[k][1] if k in logged else None for k in backlog], phase.fault_end
                ),
                gateway=f"{calls.count('ok')}/{len(calls)}",
                notes=notes,
            )
        )
    return rows


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def markdown(rows: list[Row], settings: str) -> str:
    header = (
        "| fault | sent | answered | errors | logged | duplicated log rows | lost | answered, not logged "
        "| outputs repeated "
        "| service exits | replica failures | longest stall s | first answer s | answers drained s "
        "| logs drained s | gateway ok/calls |"
    )
    lines = [settings, "", header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.phase.name} | {r.sent} | {r.answered} | {r.errors} | {r.logged} | {r.duplicated} | "
            f"{r.lost} | {r.unlogged} | {r.dup_outputs} | {r.phase.unplanned_exits} | "
            f"{r.phase.replica_failures:.0f} | {r.stall:.1f} | "
            f"{seconds(r.first_answer)} | {seconds(r.drained)} | {seconds(r.logs_drained)} | {r.gateway} |"
        )
    notes = [f"- {r.phase.name}: " + "; ".join(r.notes) for r in rows if r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def git_commit() -> str:
    found = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return found.stdout.strip() or "unknown"


@contextmanager
def traffic(threads: list[Feeder | GatewayCaller | Collector]) -> Iterator[None]:
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.stopping.set()
        for thread in threads:
            thread.join(70)


def deploy(stack: Stack, work: Path) -> tuple[Client, str]:
    """The models and the python step uploaded, the pipeline deployed, its live assay created."""
    token = admin_token(stack.env["JOEY_REGISTRY_ADDR"], stack.secrets["JOEY_ADMIN_PASSWORD"])
    client = Client(settings=stack.settings, workspace=WORKSPACE, token=token)
    forest = client.upload_model("iris", train_and_export(work / "iris.onnx"))
    logreg = client.upload_model("iris-logreg", train_and_export(work / "iris-logreg.onnx", kind="logreg"))
    post = client.upload_model(
        "iris-post",
        HERE.parent / "examples" / "steps" / "iris_postprocess.py",
        framework="python",
        input_schema={"label": ("int64", (-1,)), "probabilities": ("float32", (-1, 3))},
        output_schema={"species": ("string", (-1,)), "confidence": ("float32", (-1,))},
    )
    pipeline = client.build_pipeline(PIPELINE).add_shadow_deploy(forest, [logreg]).add_model_step(post)
    pipeline.deploy(replicas=1, wait=True, timeout=180)
    baseline = [row["features"][2] for row in make_records(1000, seed=3)]
    client.build_assay(ASSAY, PIPELINE, "input features 2", baseline_data=baseline).add_width(
        seconds=10
    ).add_start(datetime.now(UTC)).upload()
    return client, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200, help="records/s written to the inputs topic")
    parser.add_argument(
        "--gateway-rate", type=float, default=5, help="gateway calls/s (two rows each); 0: none"
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--lead-s", type=float, default=5, help="steady stream before each fault")
    parser.add_argument("--tail-s", type=float, default=2, help="steady stream after each recovery")
    parser.add_argument("--recover-s", type=float, default=60, help="longest wait for a recovery")
    parser.add_argument("--down-s", type=float, default=5, help="how long Postgres and Redis stay down")
    parser.add_argument("--pause-s", type=float, default=10, help="how long the broker is stopped")
    parser.add_argument("--settle-s", type=float, default=30, help="end when nothing moved for this long")
    parser.add_argument("--faults", help=f"comma-separated subset of {', '.join(FAULTS)}")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK)}, shorter")
    parser.add_argument("--keep-logs", type=Path, help="copy the service logs here")
    args = parser.parse_args()
    chosen = (
        [f.strip() for f in args.faults.split(",")] if args.faults else list(QUICK if args.quick else FAULTS)
    )
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    if args.quick:
        args.lead_s, args.recover_s, args.pause_s, args.down_s, args.settle_s = 2, 30, 3, 2, 15
    args.run_id = f"f{os.getpid()}"

    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, interrupt)  # unwinds like Ctrl-C: every process is stopped
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-faults-")))
        services = Stack(work, args)
        if args.keep_logs:
            stack.callback(lambda: shutil.copytree(services.logs, args.keep_logs, dirs_exist_ok=True))
        print(f"starting a private stack in {work}", flush=True)
        services.start(stack)
        client, token = deploy(services, work)
        stack.callback(client.close)
        rows = make_records(1000, seed=1)
        encoded = [json.dumps(row).encode() for row in rows]
        names = topics.pipeline_topics(WORKSPACE, PIPELINE)
        ctx = Context(services, Feeder(services.settings, names.inputs, encoded, args.rate), args, encoded[0])
        gateway_url = f"http://{services.env['JOEY_OIP_HTTP_ADDR']}/v2/models/{PIPELINE}/infer"
        gateway = GatewayCaller(gateway_url, token, [row["features"] for row in rows], args.gateway_rate)
        collector = Collector(services.settings, names)
        run = Run(ctx, collector, gateway, LogTable(services.database_url))
        first = Phase("warm-up", f"{args.run_id}-warm")
        ctx.feeder.phase = gateway.phase = first
        started = time.monotonic()
        callers = [gateway] if args.gateway_rate > 0 else []
        with traffic([collector, ctx.feeder, *callers]):
            for index, name in enumerate(chosen):
                run.phase(index, name)
            run.settle()
        result = figures(run)
        assay = client.get_assay_results(ASSAY)
        gateway_rows = [v for k, v in LogTable(services.database_url).rows().items() if len(k) == 32]
        settings = (
            f"Run of `bench/faults.py` at {git_commit()} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{platform.node()} ({os.cpu_count()} cores): {args.rate:.0f} records/s to the inputs topic and "
            f"{args.gateway_rate:g} gateway calls/s of 2 rows, {args.partitions} partitions, 1 replica; "
            f"lead {args.lead_s:g} s, Postgres and Redis down {args.down_s:g} s, broker paused "
            f"{args.pause_s:g} s, recovery awaited up to {args.recover_s:g} s; "
            f"{time.monotonic() - started:.0f} s in all."
        )
        print()
        print(markdown(result, settings))
        gateway_dups = sum(n - 1 for n, _ in gateway_rows)
        print(
            f"\nGateway-made records (keyed by the gateway's request id): {len(gateway_rows)} logged, "
            f"{gateway_dups} duplicated log rows. Live assay: {len(assay)} windows scored. "
            f"Logger dead letters: {collector.dead_letters}. Input records the broker refused: "
            f"{len(ctx.feeder.failed)}."
        )
        # Lost or duplicated, or answered and never logged (the log is the record of what was served).
        if any(r.lost or r.duplicated or r.unlogged or r.unanswered for r in result) or gateway_dups:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
