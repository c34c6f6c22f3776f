"""`joey up` / `joey down`: the whole stack on one machine, each service its own process.

The embedded broker is started unless ``JOEY_KAFKA_BOOTSTRAP`` is set (then that cluster
is used). Postgres and Redis are expected to run already. A service that dies is
restarted (it resumes from its committed offsets); Ctrl-C or `joey down` stops
everything in reverse order.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from joey_cli.broker import EmbeddedBroker
from joey_core import db, heartbeats
from joey_core.kafka import admin_client, ensure_topics, platform_topics, wait_for_broker
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = ("registry", "engine", "logger", "assayer", "gateway")
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


class StackSettings(CommonSettings):
    state_dir: Path = Path(".joey")
    """Where `joey up` keeps its pid file, state and service logs."""

    ready_timeout_s: float = 90.0

    embedded_broker: bool | None = None
    """Start the embedded broker on JOEY_KAFKA_BOOTSTRAP's port.
    Default: only when JOEY_KAFKA_BOOTSTRAP is unset."""


class StackError(RuntimeError):
    pass


def _wait(predicate: Callable[[], bool], timeout: float, what: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if stop.is_set():
            raise StackError(f"interrupted while waiting for {what}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def registry_ready(addr: str) -> bool:
    try:
        with grpc.insecure_channel(addr) as channel:
            registry_pb2_grpc.RegistryStub(channel).ListWorkspaces(
                registry_pb2.ListWorkspacesRequest(), timeout=2
            )
        return True
    except grpc.RpcError:
        return False


@dataclass
class _Service:
    name: str
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    @property
    def instance_id(self) -> str:
        return f"{self.name}-{socket.gethostname()}-{self.restarts}-{os.getpid()}"

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", f"joey_{self.name}"],
                env=self.env | {"JOEY_INSTANCE_ID": self.instance_id},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order.
            )

    def stop(self, timeout: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
                self.process.kill()
                self.process.wait()


@dataclass
class LocalStack:
    settings: StackSettings
    say: Callable[[str], None] = print
    broker: EmbeddedBroker | None = None
    services: list[_Service] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        if self.settings.embedded_broker is not None:
            return self.settings.embedded_broker
        return "kafka_bootstrap" not in self.settings.model_fields_set

    @property
    def state_file(self) -> Path:
        return self.settings.state_dir / "stack.json"

    def _write_state(self, status: str) -> None:
        state = {
            "status": status,
            "pid": os.getpid(),
            "kafka_bootstrap": self.settings.kafka_bootstrap,
            "registry_addr": self.settings.registry_addr,
            "services": {s.name: s.process.pid for s in self.services if s.process},
        }
        self.state_file.write_text(json.dumps(state))

    def start(self, stop: threading.Event) -> None:
        s = self.settings
        logs = s.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._write_state("starting")
        if self.embedded:
            host, _, port = s.kafka_bootstrap.rpartition(":")
            if _port_open(host, int(port)):
                raise StackError(
                    f"{s.kafka_bootstrap} is already in use: another `joey up`? Run `joey down`, "
                    "or set JOEY_KAFKA_BOOTSTRAP to use a running Kafka cluster"
                )
            self.say(f"starting embedded Kafka-compatible broker on {s.kafka_bootstrap}")
            self.broker = EmbeddedBroker(int(port), logs / "broker.log").start()
        else:
            self.say(f"using Kafka at {s.kafka_bootstrap}")
            wait_for_broker(s.kafka_bootstrap)
        self.say("preparing Postgres database and Kafka topics")
        redis.Redis.from_url(s.redis_url).ping()
        db.prepare(s.database_url)
        ensure_topics(admin_client(s), platform_topics(s))
        env = os.environ | {"JOEY_KAFKA_BOOTSTRAP": s.kafka_bootstrap}
        self.services = [_Service(name, logs / f"{name}.log", env) for name in SERVICES]
        registry, *workers = self.services
        registry.start()
        self.say(f"starting registry on {s.registry_addr}")
        _wait(lambda: registry_ready(s.registry_addr), s.ready_timeout_s, "registry", stop)
        for service in workers:
            self.say(f"starting {service.name}")
            service.start()
        client = redis.Redis.from_url(s.redis_url)
        for service in workers:

            def ready(svc: _Service = service) -> bool:
                return svc.instance_id in heartbeats.live_services(client, s.redis_prefix, svc.name)

            _wait(ready, s.ready_timeout_s, service.name, stop)
        self._write_state("ready")
        self.say(f"Joey is up: registry {s.registry_addr}, Kafka {s.kafka_bootstrap}; logs in {logs}")

    def supervise(self, stop: threading.Event) -> None:
        """Restart services that exit unexpectedly, until ``stop`` is set."""
        while not stop.wait(0.5):
            for service in self.services:
                if service.process is None or service.process.poll() is None:
                    continue
                now = time.monotonic()
                if service.next_start == 0.0:
                    delay = RESTART_BACKOFF_S[min(service.restarts, len(RESTART_BACKOFF_S) - 1)]
                    service.next_start = now + delay
                    log.warning(
                        "%s exited with code %s; restarting in %.0fs (see %s)",
                        service.name,
                        service.process.returncode,
                        delay,
                        service.log_path,
                    )
                elif now >= service.next_start:
                    service.restarts += 1
                    service.next_start = 0.0
                    service.start()
                    self._write_state("ready")

    def stop(self) -> None:
        self.say("stopping Joey")
        for service in reversed(self.services):
            service.stop()
        if self.broker:
            self.broker.stop()
        self.state_file.unlink(missing_ok=True)
        self.say("stopped")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host or "127.0.0.1", port)) == 0


def run_foreground(settings: StackSettings) -> None:
    """`joey up`: start, supervise until Ctrl-C / SIGTERM, stop."""
    from joey_core.lifecycle import shutdown_event

    stop = shutdown_event()
    stack = LocalStack(settings)
    try:
        stack.start(stop)
        stack.supervise(stop)
    finally:
        stack.stop()


def start_detached(settings: StackSettings) -> dict[str, object]:
    """`joey up --detach`: run the stack in a background process and return once it is ready."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    state_file = settings.state_dir / "stack.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _pid_alive(int(state["pid"])):
            raise StackError(f"Joey is already running (pid {state['pid']}); `joey down` stops it")
        state_file.unlink()
    log_path = settings.state_dir / "up.log"
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "joey_cli", "up"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + settings.ready_timeout_s + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise StackError("`joey up` failed:\n" + "\n".join(tail))
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state.get("status") == "ready" and state.get("pid") == process.pid:
                return dict(state)
        time.sleep(0.1)
    process.terminate()
    raise StackError(f"stack not ready in time; see {log_path}")


def stop_detached(settings: StackSettings, timeout: float = 60.0) -> bool:
    """`joey down`: stop a stack started by `joey up`; False if none was running."""
    state_file = settings.state_dir / "stack.json"
    if not state_file.exists():
        return False
    pid = int(json.loads(state_file.read_text())["pid"])
    if not _pid_alive(pid):
        state_file.unlink()
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise StackError(f"stack (pid {pid}) did not stop within {timeout:.0f}s")
        time.sleep(0.1)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True
