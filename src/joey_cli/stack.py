"""`joey up` / `joey down`: the whole stack on one machine, each service its own process.

The embedded broker is started unless ``JOEY_KAFKA_BOOTSTRAP`` is set (then that cluster
is used). Postgres and Redis are expected to run already. A service that dies is
restarted (it resumes from its committed offsets); Ctrl-C or `joey down` stops
everything in reverse order.

One stack per state directory (per user by default, whatever the current directory): its
supervisor holds ``stack.lock`` for as long as it lives, so a second `joey up` is refused and
`joey down` finds it from anywhere. ``stack.json`` describes it (pid, addresses, service pids); one
left behind by a supervisor that was killed is stale, and `joey up` / `joey down` stop what it left.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
from pydantic import Field, field_validator

from joey_core.settings import CommonSettings

if TYPE_CHECKING:
    from joey_cli.broker import EmbeddedBroker

log = logging.getLogger(__name__)

SERVICES = ("registry", "engine", "logger", "assayer", "gateway")
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)

State = dict[str, Any]


class StackSettings(CommonSettings):
    state_dir: Path = Field(default_factory=lambda: platformdirs.user_state_path("joey"))
    """Where `joey up` keeps its lock, state and service logs: one stack per user, found from any
    directory (``~/.local/state/joey``, or ``$XDG_STATE_HOME/joey``, on Linux)."""

    oip_grpc_addr: str = "127.0.0.1:8081"
    """The gateway's Open Inference Protocol gRPC address (JOEY_OIP_GRPC_ADDR, as the gateway reads it)."""

    oip_http_addr: str = "127.0.0.1:8080"
    """The gateway's Open Inference Protocol REST address (JOEY_OIP_HTTP_ADDR, as the gateway reads it)."""

    ready_timeout_s: float = 90.0

    embedded_broker: bool | None = None
    """Start the embedded broker on JOEY_KAFKA_BOOTSTRAP's port.
    Default: only when JOEY_KAFKA_BOOTSTRAP is unset."""

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # Recorded and printed as given to every later command, whichever directory it runs in.
        return path.expanduser().absolute()


class StackError(RuntimeError):
    pass


class AlreadyRunning(StackError):
    def __init__(self, state: State) -> None:
        super().__init__(
            f"Joey is already running (pid {state['pid']}); `joey down` stops it\n"
            + "\n".join(describe(state))
        )
        self.state = state


def describe(state: State) -> list[str]:
    """A stack's addresses and logs, one line each, as `joey up` and `joey status` print them."""
    kafka = state.get("kafka_bootstrap", "?") + (" (embedded broker)" if state.get("embedded") else "")
    return [
        f"  registry  {state.get('registry_addr', '?')} (gRPC)",
        f"  gateway   http://{state.get('oip_http_addr', '?')} (REST), {state.get('oip_grpc_addr', '?')} "
        "(gRPC): the Open Inference Protocol",
        f"  Kafka     {kafka}",
        f"  logs      {state.get('logs', '?')}",
    ]


class _Lock:
    """An exclusive flock, held by the supervisor while it lives; the kernel drops it when it exits."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def record(self, pid: int) -> None:
        # The pid inside the lock file too: `joey down` can find the holder before its state is written.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(pid).encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


class StackDir:
    """The files of the one stack a state directory holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_file = path / "stack.json"
        self.lock_file = path / "stack.lock"
        self.logs = path / "logs"
        self.up_log = path / "up.log"

    def try_lock(self) -> _Lock | None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _Lock(fd)

    def read(self) -> State | None:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring %s: not the JSON `joey up` writes", self.state_file)
            return None

    def write(self, state: State) -> None:
        # Replaced whole, so a reader never sees half a file.
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(state))
        partial.replace(self.state_file)

    def remove(self) -> None:
        self.state_file.unlink(missing_ok=True)

    def held(self) -> bool:
        """Whether a supervisor holds the lock, i.e. the stack runs."""
        if not self.lock_file.exists():
            return False
        lock = self.try_lock()
        if lock is not None:
            lock.release()
        return lock is None

    def running(self) -> State | None:
        """The running stack's state; None when no supervisor holds the lock."""
        if not self.held():
            return None
        deadline = time.monotonic() + 2
        while (state := self.read()) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the supervisor writes its state right after taking the lock
        if state is None:
            text = self.lock_file.read_text().strip()
            state = {"pid": int(text) if text.isdigit() else "unknown", "status": "starting"}
        return state

    def clear_stale(self, say: Callable[[str], None]) -> None:
        """With the lock held: stop what a supervisor that died without stopping left, and forget it."""
        state = self.read()
        if state is None:
            return
        leftovers = [
            (name, pid)
            for name, pid in [*state.get("services", {}).items(), ("broker", state.get("broker"))]
            if pid and _runs(int(pid), "tansu" if name == "broker" else f"joey_{name}")
        ]
        message = f"the stack of pid {state.get('pid')} exited without stopping"
        if leftovers:
            say(f"{message}: stopping what it left, " + ", ".join(f"{n} (pid {p})" for n, p in leftovers))
            for _, pid in reversed(leftovers):
                _terminate(int(pid))
        else:
            say(f"{message}; removing its state {self.state_file}")
        self.remove()


def _runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and still the process we started (pids are reused)."""
    if not pid_alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
        command = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True
        ).stdout
    return marker in command


def _terminate(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)


def claim(files: StackDir, say: Callable[[str], None]) -> _Lock:
    """The stack's lock, refused while another stack runs; a stale stack's leftovers are stopped."""
    lock = files.try_lock()
    if lock is None:
        raise AlreadyRunning(files.running() or {"pid": "unknown"})
    files.clear_stale(say)
    return lock


def _wait(predicate: Callable[[], bool], timeout: float, what: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if stop.is_set():
            raise StackError(f"interrupted while waiting for {what}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def registry_ready(addr: str) -> bool:
    import grpc

    from joey_core.v1 import registry_pb2, registry_pb2_grpc

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

    def check_running(self) -> None:
        """Fail the start at once when the service exits, instead of waiting out the timeout."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-10:]
            raise StackError(
                f"{self.name} exited with code {self.process.returncode} while starting; "
                f"the end of {self.log_path}:\n" + "\n".join(tail)
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
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def embedded(self) -> bool:
        if self.settings.embedded_broker is not None:
            return self.settings.embedded_broker
        return "kafka_bootstrap" not in self.settings.model_fields_set

    @property
    def files(self) -> StackDir:
        return StackDir(self.settings.state_dir)

    def state(self, status: str) -> State:
        s = self.settings
        return {
            "status": status,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "kafka_bootstrap": s.kafka_bootstrap,
            "embedded": self.embedded,
            "registry_addr": s.registry_addr,
            "oip_http_addr": s.oip_http_addr,
            "oip_grpc_addr": s.oip_grpc_addr,
            "logs": str(self.files.logs),
            "services": {s.name: s.process.pid for s in self.services if s.process},
            "broker": self.broker.process.pid if self.broker and self.broker.process else None,
        }

    def _write_state(self, status: str) -> None:
        self.files.write(self.state(status))

    def start(self, stop: threading.Event) -> None:
        # Imported here: `joey status` and `joey down` read the state without loading Kafka and numpy.
        import redis

        from joey_cli.broker import EmbeddedBroker
        from joey_core import db, heartbeats
        from joey_core.kafka import admin_client, ensure_topics, platform_topics, wait_for_broker

        s = self.settings
        logs = self.files.logs
        logs.mkdir(parents=True, exist_ok=True)
        self._write_state("starting")
        # Refused up front: a service that cannot bind its port would only show up as a timeout.
        addresses = {
            "registry": s.registry_addr,
            "gateway REST": s.oip_http_addr,
            "gateway gRPC": s.oip_grpc_addr,
        }
        taken = [f"{what} {addr}" for what, addr in addresses.items() if _addr_in_use(addr)]
        if taken:
            raise StackError(
                f"{', '.join(taken)} already in use by another process (a stack with another "
                "JOEY_STATE_DIR?): stop it, or set JOEY_REGISTRY_ADDR / JOEY_OIP_HTTP_ADDR / "
                "JOEY_OIP_GRPC_ADDR"
            )
        if self.embedded:
            if _addr_in_use(s.kafka_bootstrap):
                raise StackError(
                    f"{s.kafka_bootstrap} is already in use by another process (a stack with another "
                    "JOEY_STATE_DIR, or a Kafka broker): stop it, or set JOEY_KAFKA_BOOTSTRAP to use "
                    "a running Kafka cluster"
                )
            self.say(f"starting embedded Kafka-compatible broker on {s.kafka_bootstrap}")
            _, _, port = s.kafka_bootstrap.rpartition(":")
            self.broker = EmbeddedBroker(int(port), logs / "broker.log").start()
        else:
            self.say(f"using Kafka at {s.kafka_bootstrap}")
            wait_for_broker(s.kafka_bootstrap)
        self.say("preparing Postgres database and Kafka topics")
        redis.Redis.from_url(s.redis_url).ping()
        db.prepare(s.database_url)
        ensure_topics(admin_client(s), platform_topics(s))
        # The settings this stack runs with, whether read from the environment or given in code.
        env = os.environ | {
            "JOEY_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "JOEY_REGISTRY_ADDR": s.registry_addr,
            "JOEY_OIP_HTTP_ADDR": s.oip_http_addr,
            "JOEY_OIP_GRPC_ADDR": s.oip_grpc_addr,
        }
        self.services = [_Service(name, logs / f"{name}.log", env) for name in SERVICES]
        registry, *workers = self.services
        registry.start()
        self._write_state("starting")
        self.say(f"starting registry on {s.registry_addr}")

        def registry_up() -> bool:
            registry.check_running()
            return registry_ready(s.registry_addr)

        _wait(registry_up, s.ready_timeout_s, "registry", stop)
        for service in workers:
            self.say(f"starting {service.name}")
            service.start()
        self._write_state("starting")
        client = redis.Redis.from_url(s.redis_url)
        for service in workers:

            def ready(svc: _Service = service) -> bool:
                svc.check_running()
                return svc.instance_id in heartbeats.live_services(client, s.redis_prefix, svc.name)

            _wait(ready, s.ready_timeout_s, service.name, stop)
        self._write_state("ready")

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
        self.files.remove()
        self.say("stopped")


def _addr_in_use(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    # A wildcard listen address is reached on the loopback.
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host.strip("[]")  # noqa: S104
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def run_foreground(settings: StackSettings, say: Callable[[str], None] = print) -> None:
    """`joey up`: start, supervise until Ctrl-C / SIGTERM, stop."""
    from joey_core.lifecycle import shutdown_event

    files = StackDir(settings.state_dir)
    lock = claim(files, say)
    lock.record(os.getpid())
    stop = shutdown_event()
    stack = LocalStack(settings, say)
    try:
        stack.start(stop)
        say(f"Joey is up (pid {os.getpid()}); Ctrl-C or `joey down` stops it")
        for line in describe(stack.state("ready")):
            say(line)
        stack.supervise(stop)
    finally:
        stack.stop()
        lock.release()


def start_detached(settings: StackSettings, say: Callable[[str], None] = print) -> State:
    """`joey up --detach`: run the stack in a background process and return its state once it is ready."""
    files = StackDir(settings.state_dir)
    # Checked here too, so that a second `joey up --detach` is refused before anything starts.
    claim(files, say).release()
    with files.up_log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "joey_cli", "up"],
            env=os.environ | {"JOEY_STATE_DIR": str(files.path)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + settings.ready_timeout_s + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = files.up_log.read_text(errors="replace").splitlines()[-15:]
            raise StackError(f"`joey up` failed; the end of {files.up_log}:\n" + "\n".join(tail))
        state = files.read()
        if state and state.get("status") == "ready" and state.get("pid") == process.pid:
            return state
        time.sleep(0.1)
    process.terminate()
    raise StackError(f"stack not ready in time; see {files.up_log}")


def stop_detached(
    settings: StackSettings, timeout: float = 60.0, say: Callable[[str], None] = print
) -> State | None:
    """`joey down`: stop the stack of this state directory; its state, or None if none was running."""
    files = StackDir(settings.state_dir)
    state = files.running()
    if state is None:
        if files.state_file.exists() and (lock := files.try_lock()) is not None:
            files.clear_stale(say)
            lock.release()
        return None
    pid = state["pid"]
    if not isinstance(pid, int):
        raise StackError(f"a stack holds {files.lock_file} but its pid is unknown; stop it yourself")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while files.held() or pid_alive(pid):
        if time.monotonic() > deadline:
            raise StackError(f"stack (pid {pid}) did not stop within {timeout:.0f}s; see {files.logs}")
        time.sleep(0.1)
    return state


def stack_status(settings: StackSettings) -> tuple[State | None, State | None]:
    """The running stack's state, and the stale state of one that died without stopping."""
    files = StackDir(settings.state_dir)
    running = files.running()
    return running, None if running else files.read()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone: a child of ours is reaped here; an orphan waits for a reaper that may be slow.
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return not Path("/proc/self").exists()
