"""Throughput and latency of the Joey engine against a hand-written consumer loop, in one run.

Both systems run the same ONNX model (examples/train_model.py) on the same records, on the
same embedded broker, as separate processes, one at a time. The Joey side is the real
deployed path: `joey serve registry` and `joey serve engine` processes, the model uploaded
and the pipeline deployed with the SDK. The baseline is bench/baseline.py.

Scenarios, each repeated ``--repeats`` times (the median is reported):

* drain: ``--records`` records are written while the system is stopped, then it starts;
  throughput = records / (last output - first output): pure processing speed.
* flood: the system runs; ``--records`` records are written as fast as possible;
  throughput = records / (last output - first record produced). Latency includes queueing.
* paced: ``--rate`` records/s for ``--paced-seconds``, below either system's capacity:
  the latency of a system that keeps up.

Latency = time from producing a record to the collector reading its output back. Every run
uses fresh topics (for Joey, a pipeline deployed for that run), and the two systems take
turns scenario by scenario, so neither benefits from running first or on emptier topics.

    python bench/engine_throughput.py --records 50000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis
from psycopg import sql

from joey.client import Client, ModelVersion, Pipeline
from joey_cli.broker import EmbeddedBroker
from joey_core import db, topics
from joey_core.kafka import TopicSpec, admin_client, ensure_topics
from joey_core.settings import CommonSettings
from joey_core.topics import pipeline_topics
from joey_core.v1 import registry_pb2, registry_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from measure import (  # noqa: E402
    Background,
    Collected,
    Collector,
    CpuSampler,
    Feeder,
    Load,
    Roles,
    Sample,
    descendants,
    drain_sample,
    live_sample,
    median,
)

from train_model import make_records, train_and_export  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
WORKSPACE = "default"
PIPELINE = "bench"
SCENARIOS = ("drain", "flood", "paced")
SYSTEMS = ("baseline", "baseline-same-bytes", "joey")
WARMUP_RECORDS = 500
SAMPLE_EVERY = 997
"""Every this many records, the output value is kept to check both systems computed the same labels."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Process:
    """A child process with its output in a log file; stopped with SIGTERM, killed if it hangs."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=os.environ | self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def check(self) -> None:
        """Raise if the process exited on its own (not yet started is fine: a drain run starts it late)."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            code = self.process.returncode
            raise RuntimeError(f"{self.name} exited with code {code}; end of its log:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class System(ABC):
    """A system under test: reads a run's input topic, writes one output per record to its output topic.

    Every run gets fresh topics: the embedded broker's fetch cost grows with the number of
    record batches in a topic, so reused topics would make later runs slower for reasons that
    are not the system's.
    """

    name: str
    inputs = outputs = ""
    errors: tuple[str, ...] = ()
    logs: tuple[str, ...] = ()
    """Topics of the system's log records, whose bytes per input the collector counts."""

    @abstractmethod
    def prepare(self, run: str, running: bool) -> None:
        """Make fresh topics for ``run``; with ``running``, return once the system consumes them,
        else leave it stopped until :meth:`start` (records written in between wait for it)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def finish(self) -> None:
        """The run is over: stop consuming its topics."""

    @abstractmethod
    def check(self) -> None:
        """Raise if a process of the system died."""

    @abstractmethod
    def label(self, value: bytes) -> int:
        """The predicted label in one output record."""

    @abstractmethod
    def roles(self) -> Roles:
        """The system's processes whose CPU is measured: ``own`` (what runs the records) and any other."""


def pids_of(process: Process | None) -> list[int]:
    return [] if process is None or process.process is None else [process.process.pid]


class Baseline(System):
    """bench/baseline.py; with ``joey_bytes`` (the ``baseline-same-bytes`` system), writing Joey's bytes."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: CommonSettings,
        model: Path,
        log_dir: Path,
        joey_bytes: bool = False,
    ) -> None:
        self.args = args
        self.settings = settings
        self.model = model
        self.log_dir = log_dir
        self.joey_bytes = joey_bytes
        self.name = "baseline-same-bytes" if joey_bytes else "baseline"
        self.process: Process | None = None

    def prepare(self, run: str, running: bool) -> None:
        prefix = f"bench.{self.name}.{run}"
        self.inputs, self.outputs = f"{prefix}.inputs", f"{prefix}.outputs"
        self.logs: tuple[str, ...] = (f"{prefix}.logs",) if self.joey_bytes else ()
        specs = [TopicSpec(t, self.args.partitions) for t in (self.inputs, self.outputs, *self.logs)]
        ensure_topics(admin_client(self.settings), specs)
        args = self.args
        argv = [
            sys.executable,
            str(HERE / "baseline.py"),
            f"--bootstrap={self.settings.kafka_bootstrap}",
            f"--model={self.model}",
            f"--input-topic={self.inputs}",
            f"--output-topic={self.outputs}",
            f"--group={prefix}",
            f"--partitions={args.partitions}",
            f"--replicas={args.replicas}",
            f"--batch-size={args.batch_size}",
            f"--batch-delay-ms={args.batch_delay_ms}",
        ]
        if self.joey_bytes:
            argv += [
                "--joey-bytes",
                f"--log-topic={self.logs[0]}",
                f"--log-bytes-per-record={args.log_bytes}",
            ]
        self.process = Process(f"{self.name}-{run}", argv, {}, self.log_dir)
        if running:
            self.start()
            # baseline.py prints READY once its group owns every partition.
            log = self.process.log_path

            def ready() -> bool:
                self.check()
                return b"READY" in log.read_bytes()

            wait_until(ready, 60, "baseline consumers")

    def start(self) -> None:
        assert self.process is not None
        self.process.start()

    def finish(self) -> None:
        if self.process is not None:
            self.process.stop()

    def check(self) -> None:
        if self.process is not None:
            self.process.check()

    def label(self, value: bytes) -> int:
        decoded = json.loads(value)
        return int(decoded["out"]["label"] if self.joey_bytes else decoded["label"])

    def roles(self) -> Roles:
        return {"own": lambda: pids_of(self.process)}


class Joey(System):
    """The engine as deployed: a `joey serve engine` process following deployments made with the SDK.

    Each run deploys a pipeline of its own (the registry creates its topics) and undeploys it after.
    """

    name = "joey"
    logs = (topics.LOGS,)

    def __init__(
        self, args: argparse.Namespace, client: Client, model: ModelVersion, engine: Process
    ) -> None:
        self.args = args
        self.client = client
        self.model = model
        self.engine = engine
        self.pipeline: Pipeline | None = None

    def prepare(self, run: str, running: bool) -> None:
        name = f"{PIPELINE}-{run}"
        names = pipeline_topics(WORKSPACE, name)
        self.inputs, self.outputs, self.errors = names.inputs, names.outputs, (names.errors,)
        if running and self.engine.process is None:
            self.engine.start()
        if not running:
            self.engine.stop()
        self.pipeline = self.client.build_pipeline(name).add_model_step(self.model)
        # Ready means every replica is loaded and the group's partitions are all assigned.
        self.pipeline.deploy(replicas=self.args.replicas, wait=running, timeout=120)

    def start(self) -> None:
        self.engine.start()

    def finish(self) -> None:
        if self.pipeline is not None:
            self.pipeline.undeploy()

    def check(self) -> None:
        self.engine.check()

    def label(self, value: bytes) -> int:
        return int(json.loads(value)["out"]["label"])

    def roles(self) -> Roles:
        # The replicas are child processes of the engine (and whatever they start); the engine's own
        # process supervises them. Looked up again at most every half second, since scanning /proc costs.
        found: list[int] = []
        looked = [-math.inf]

        def replicas() -> list[int]:
            if time.monotonic() - looked[0] > 0.5:
                found[:] = [p for pid in pids_of(self.engine) for p in descendants(pid)]
                looked[0] = time.monotonic()
            return found

        return {"own": replicas, "engine": lambda: pids_of(self.engine)}


class Bench:
    def __init__(
        self, args: argparse.Namespace, settings: CommonSettings, rows: list[dict[str, Any]], broker: int
    ) -> None:
        self.args = args
        self.settings = settings
        self.broker = broker
        self.feeder = Feeder(settings)
        self.rows = rows
        self.samples: dict[tuple[str, str], list[Sample]] = {}
        self.labels: dict[str, dict[int, int]] = {}

    def collect(
        self, system: System, count: int, produce: Callable[[Load], None]
    ) -> tuple[Load, Collected, CpuSampler]:
        load = Load.of(f"{system.name}-{secrets.token_hex(4)}", self.rows, count)
        collector = Collector(self.settings, [system.outputs], system.errors, system.logs)
        # "bench": this process, whose collector reads every output back during the drain.
        cpu = CpuSampler({**system.roles(), "broker": lambda: [self.broker], "bench": lambda: [os.getpid()]})
        try:
            expected, keep = set(load.ids), frozenset(load.ids[::SAMPLE_EVERY])
            timeout = self.args.timeout + count / 200
            background = Background(lambda: collector.collect(expected, timeout, system.check, keep))
            produce(load)
            collected = background.result()
        finally:
            cpu.stop()
            collector.close()
        if collected.errors:
            rid, value = next(iter(collected.errors.items()))
            raise RuntimeError(
                f"{system.name}: {len(collected.errors)} records failed; {rid}: {value[:500]!r}"
            )
        labels = self.labels.setdefault(system.name, {})
        for rid, value in collected.samples.items():
            labels[load.ids.index(rid) % len(self.rows)] = system.label(value)
        return load, collected, cpu

    def run(self, system: System, scenario: str, rep: int) -> None:
        args = self.args
        system.prepare(f"{scenario}-{rep}", running=scenario != "drain")
        try:
            if scenario == "drain":

                def preload_then_start(load: Load) -> None:
                    self.feeder.flood(system.inputs, load)
                    system.start()

                load, collected, cpu = self.collect(system, args.records, preload_then_start)
                sample = drain_sample(load, collected, cpu)
            else:
                # A round trip first, so connections and fetch sessions are warm.
                self.collect(system, WARMUP_RECORDS, lambda load: self.feeder.flood(system.inputs, load))
                if scenario == "flood":
                    load, collected, _ = self.collect(
                        system, args.records, lambda load: self.feeder.flood(system.inputs, load)
                    )
                else:
                    count = math.ceil(args.rate * args.paced_seconds)
                    load, collected, _ = self.collect(
                        system, count, lambda load: self.feeder.paced(system.inputs, load, args.rate)
                    )
                sample = live_sample(load, collected)
        finally:
            system.finish()
        self.samples.setdefault((system.name, scenario), []).append(sample)
        if scenario == "drain":
            spent = "  ".join(f"{role} {us:5.1f}" for role, us in sample.cpu_us.items())
            extra = f"  CPU µs/record: {spent}"
        else:
            extra = f"  p50 {sample.p50_ms:8.1f} ms  p99 {sample.p99_ms:8.1f} ms"
        print(f"  {system.name:19} {scenario:6} {sample.throughput:10,.0f} records/s{extra}", flush=True)


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"joey_bench_{secrets.token_hex(4)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    db.prepare(url)
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def scratch_redis_prefix() -> Iterator[str]:
    prefix = f"joeybench{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


def registry_ready(addr: str) -> bool:
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            stub.WhoAmI(registry_pb2.WhoAmIRequest(), timeout=2)
        return True
    except grpc.RpcError as exc:
        # Asked without a token: refusing it is the registry answering.
        return bool(exc.code() == grpc.StatusCode.UNAUTHENTICATED)


def stack_secrets() -> dict[str, str]:
    """The identity secrets of a bench stack: the registry makes `admin` with the password on its empty
    database; engines present the service token to download artifacts."""
    return {
        "JOEY_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        "JOEY_SERVICE_TOKEN": "joey_" + secrets.token_urlsafe(32),
    }


def admin_token(registry_addr: str, password: str) -> str:
    """A session of the platform admin the bench's registry created."""
    with grpc.insecure_channel(registry_addr) as channel:
        login = registry_pb2_grpc.RegistryStub(channel).Login(
            registry_pb2.LoginRequest(username="admin", password=password), timeout=10
        )
    return str(login.token)


def start_joey(
    args: argparse.Namespace,
    settings: CommonSettings,
    env: dict[str, str],
    model: Path,
    stack: ExitStack,
    logs: Path,
) -> Joey:
    """Registry and engine processes up, the model uploaded."""
    registry = Process("registry", [sys.executable, "-m", "joey_cli", "serve", "registry"], env, logs).start()
    stack.callback(registry.stop)

    def registry_up() -> bool:
        registry.check()
        return registry_ready(settings.registry_addr)

    wait_until(registry_up, 60, "the registry")
    if args.logger:
        logger = Process("logger", [sys.executable, "-m", "joey_cli", "serve", "logger"], env, logs).start()
        stack.callback(logger.stop)
    engine = Process("engine", [sys.executable, "-m", "joey_cli", "serve", "engine"], env, logs).start()
    stack.callback(engine.stop)
    token = admin_token(settings.registry_addr, env["JOEY_ADMIN_PASSWORD"])
    client = Client(settings=settings, workspace=WORKSPACE, token=token)
    stack.callback(client.close)
    return Joey(args, client, client.upload_model("iris", model), engine)


def report(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    names = {system for system, _ in bench.samples}
    systems = [name for name in SYSTEMS if name in names]
    others = [s for s in systems if s != "baseline"] if "baseline" in systems else []
    medians = {key: median(samples) for key, samples in bench.samples.items()}
    print(
        f"\nMedian of {args.repeats} repetitions; {args.records:,} records per drain/flood run, "
        f"paced at {args.rate:,.0f} records/s for {args.paced_seconds:.0f} s"
    )
    width = max(12, *(len(s) + 1 for s in systems))
    header = f"{'scenario':8} {'metric':12}" + "".join(f"{s:>{width}}" for s in systems)
    header += "".join(f"{s + '/base':>{width + 5}}" for s in others)
    print(header)
    print("-" * len(header))
    metrics = {
        "drain": ("throughput",),
        "flood": ("throughput", "p50_ms", "p99_ms"),
        "paced": ("p50_ms", "p99_ms"),
    }
    titles = {"throughput": "records/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms"}
    for scenario, fields in metrics.items():
        if any((s, scenario) not in medians for s in systems):
            continue
        for field_name in fields:
            values = {s: getattr(medians[(s, scenario)], field_name) for s in systems}
            spec = ",.0f" if field_name == "throughput" else ".1f"
            line = f"{scenario:8} {titles[field_name]:12}" + "".join(
                format(values[s], f">{width}{spec}") for s in systems
            )
            line += "".join(f"{values[s] / values['baseline']:>{width + 5}.2f}" for s in others)
            print(line)
    drain_table(bench, systems)
    for name in others:
        a, b = bench.labels["baseline"], bench.labels[name]
        common = set(a) & set(b)
        agree = sum(a[i] == b[i] for i in common)
        print(f"labels of {name} agree with the baseline's on {agree} of {len(common)} sampled records")

    def plain(sample: Sample) -> dict[str, object]:
        # A drain run has no latency (NaN), which JSON cannot hold.
        def number(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            k: {r: number(us) for r, us in v.items()} if isinstance(v, dict) else number(v)
            for k, v in asdict(sample).items()
        }

    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples": {f"{s}/{c}": [plain(x) for x in xs] for (s, c), xs in bench.samples.items()},
        "median": {f"{s}/{c}": plain(x) for (s, c), x in medians.items()},
    }


def drain_table(bench: Bench, systems: list[str]) -> None:
    """Per drain: bytes written per input and CPU µs per record of each process group, over the span
    from the first output to the last; medians of the repetitions, each column on its own."""
    drains = {s: bench.samples[(s, "drain")] for s in systems if (s, "drain") in bench.samples}
    if not drains:
        return
    roles = ("own", "engine", "broker", "bench", "machine")
    print(
        "\ndrain: bytes per input written (outputs, logs) and CPU µs per record over the drain"
        "\n(own: the loop process, or Joey's replica processes; engine: Joey's supervising process;"
        "\n broker: the embedded broker; bench: this process, reading the outputs back;"
        "\n machine: all cores, everything on the machine, other users' work included)"
    )
    header = f"{'system':20}{'records/s':>10}{'out B':>8}{'log B':>8}" + "".join(f"{r:>9}" for r in roles)
    header += f"{'per rep records/s':>30}"
    print(header)
    print("-" * len(header))
    for system, samples in drains.items():
        m = median(samples)
        cpu = "".join(f"{m.cpu_us[r]:>9.1f}" if r in m.cpu_us else f"{'-':>9}" for r in roles)
        reps = " / ".join(f"{x.throughput:,.0f}" for x in samples)
        print(f"{system:20}{m.throughput:>10,.0f}{m.output_bytes:>8.0f}{m.log_bytes:>8.0f}{cpu}{reps:>30}")


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000, help="records per drain and flood run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="JOEY_MAX_BATCH_SIZE and the baseline's")
    parser.add_argument(
        "--batch-delay-ms", type=int, default=5, help="JOEY_MAX_BATCH_DELAY_MS and the baseline's"
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS)
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the input and output topics")
    parser.add_argument("--rate", type=float, default=1000, help="records/s of the paced run")
    parser.add_argument("--paced-seconds", type=float, default=10)
    parser.add_argument(
        "--systems", default="baseline,joey", help="comma-separated subset of " + ",".join(SYSTEMS)
    )
    parser.add_argument(
        "--log-bytes",
        type=int,
        default=340,
        help='log bytes per input of baseline-same-bytes: Joey\'s, as its "log B" column shows',
    )
    parser.add_argument("--logger", action="store_true", help="also run `joey serve logger`, as deployed")
    parser.add_argument("--timeout", type=float, default=120, help="extra seconds allowed per run")
    parser.add_argument("--json", type=Path, help="write every sample and the medians here")
    parser.add_argument("--keep-logs", type=Path, help="copy the service logs here")
    args = parser.parse_args()
    if args.replicas > args.partitions:
        parser.error("--replicas cannot exceed --partitions")
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(chosen) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}: choose among {', '.join(SYSTEMS)}")

    # SIGTERM unwinds like Ctrl-C, so every child process and scratch resource is cleaned up.
    signal.signal(signal.SIGTERM, interrupt)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-bench-")))
        logs = work / "logs"
        logs.mkdir()
        if args.keep_logs:
            stack.callback(lambda: subprocess.run(["cp", "-r", str(logs), str(args.keep_logs)], check=False))
        broker = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log"))
        database_url = stack.enter_context(scratch_database())
        prefix = stack.enter_context(scratch_redis_prefix())
        env = {
            "JOEY_KAFKA_BOOTSTRAP": broker.bootstrap,
            "JOEY_DATABASE_URL": database_url,
            "JOEY_REDIS_URL": REDIS_URL,
            "JOEY_REDIS_PREFIX": prefix,
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_ARTIFACT_DIR": str(work / "artifacts"),
            "JOEY_CACHE_DIR": str(work / "cache"),
            "JOEY_PIPELINE_PARTITIONS": str(args.partitions),
            "JOEY_LOGS_PARTITIONS": str(args.partitions),
            "JOEY_MAX_BATCH_SIZE": str(args.batch_size),
            "JOEY_MAX_BATCH_DELAY_MS": str(args.batch_delay_ms),
            **stack_secrets(),
        }
        settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in env.items()})
        model = train_and_export(work / "iris.onnx")
        rows = make_records(10_000, seed=1)
        assert broker.process is not None
        bench = Bench(args, settings, rows, broker.process.pid)
        stack.callback(bench.feeder.close)

        systems: list[System] = []
        for joey_bytes, name in ((False, "baseline"), (True, "baseline-same-bytes")):
            if name in chosen:
                baseline = Baseline(args, settings, model, logs, joey_bytes)
                stack.callback(baseline.finish)
                systems.append(baseline)
        if "joey" in chosen:
            systems.append(start_joey(args, settings, env, model, stack, logs))

        for rep in range(1, args.repeats + 1):
            print(f"repetition {rep} of {args.repeats}", flush=True)
            for scenario in args.scenarios.split(","):
                for system in systems:
                    bench.run(system, scenario, rep)
        result = report(bench, args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
