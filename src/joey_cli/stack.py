"""`joey up` / `joey down`: the whole stack on one machine, each service its own process.

The embedded broker is started unless ``JOEY_KAFKA_BOOTSTRAP`` is set (then that cluster
is used). Postgres and Redis are expected to run already. A service that dies is
restarted (it resumes from its committed offsets); Ctrl-C or `joey down` stops
everything in reverse order.

One stack per state directory (per user by default, whatever the current directory): its
supervisor holds ``stack.lock`` for as long as it lives, so a second `joey up` is refused and
`joey down` finds it from anywhere. The lock file names its holder (pid and start time, written as
soon as the lock is taken); ``stack.json`` describes the stack (pid, addresses, the pid and start
time of each process it started) and counts only when its pid is the lock holder's. One left behind
by a supervisor that was killed is stale, and `joey up` / `joey down` stop what it left.

Processes are named by pid and start time (Linux's /proc), so a reused pid is never taken for one
of ours.
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

import click
import platformdirs
from pydantic import Field, SecretStr, field_validator

from joey_cli import bootstrap
from joey_cli.errors import listening
from joey_cli.services import DATABASE_SERVICES, SERVICES, module
from joey_core import redaction
from joey_core.settings import CommonSettings, DatabaseSettings

if TYPE_CHECKING:
    from joey_cli.broker import EmbeddedBroker

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
SERVICE_STOP_S = 30.0
"""How long a service has to stop after SIGTERM before it is killed."""
BROKER_STOP_S = 10.0
"""The same for the embedded broker (EmbeddedBroker.stop)."""
DOWN_WAIT_S = SERVICE_STOP_S * len(SERVICES) + BROKER_STOP_S + 10.0
"""How long `joey down` waits: the supervisor stops the services one by one, then the broker."""
LOCK_WAIT_S = 1.0
"""How long a lock's holder may take to write its name into the lock file."""

State = dict[str, Any]


def _default_state_dir() -> Path:
    return platformdirs.user_state_path("joey")


class StackSettings(DatabaseSettings):
    state_dir: Path = Field(default_factory=_default_state_dir)
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

    stack_lock_fd: int | None = None
    """Set by `joey up --detach` for the supervisor it starts: the stack's lock, already held, handed over."""

    @field_validator("state_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty JOEY_STATE_DIR would otherwise be the current directory.
        return _default_state_dir() if value == "" else value

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # Recorded and printed as given to every later command, whichever directory it runs in.
        return path.expanduser().absolute()

    @property
    def embedded(self) -> bool:
        if self.embedded_broker is not None:
            return self.embedded_broker
        return "kafka_bootstrap" not in self.model_fields_set


def settings_env(settings: StackSettings) -> dict[str, str]:
    """The environment of a process the stack starts: this one's, with the settings the stack runs with
    spelled out, whether they came from the environment, a command-line option or code."""
    env = {name: value for name, value in os.environ.items() if name != "JOEY_STACK_LOCK_FD"}
    fields = settings.model_dump(exclude={"stack_lock_fd", "embedded_broker"})
    fields["embedded_broker"] = settings.embedded
    return env | {
        f"JOEY_{name.upper()}": _env_value(value) for name, value in fields.items() if value is not None
    }


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# A user's or the stack's credentials: a service gets them only when it uses them
# (joey_cli.bootstrap.service_env), never because the shell that ran `joey up` exported them.
_CREDENTIALS = frozenset(
    {"JOEY_TOKEN", "JOEY_CREDENTIALS", "JOEY_ADMIN_PASSWORD", "JOEY_SERVICE_TOKEN", "JOEY_SECRET_KEY"}
)


def service_env(env: dict[str, str], service: str) -> dict[str, str]:
    """The environment of ``service``: no inherited credentials, and for a service that uses no database
    not its URL either."""
    dropped = _CREDENTIALS if service in DATABASE_SERVICES else _CREDENTIALS | {"JOEY_DATABASE_URL"}
    return {k: v for k, v in env.items() if k not in dropped}


class StackError(RuntimeError):
    pass


class AlreadyRunning(StackError):
    def __init__(self, state: State) -> None:
        super().__init__(
            f"Joey is already running (pid {state.get('pid') or 'unknown'}); `joey down` stops it\n"
            + "\n".join(describe(state))
        )


def describe(state: State) -> list[str]:
    """A stack's addresses and logs, one line each, as `joey up` and `joey status` print them."""
    kafka = state.get("kafka_bootstrap", "?") + (" (embedded broker)" if state.get("embedded") else "")
    return [
        f"  registry  {state.get('registry_addr', '?')} (gRPC)",
        f"  gateway   http://{state.get('oip_http_addr', '?')} (REST), {state.get('oip_grpc_addr', '?')} "
        "(gRPC): the Open Inference Protocol",
        f"  Kafka     {kafka}",
        f"  logs      {state.get('logs', '?')}",
        *([f"  login     {state['login']}"] if state.get("login") else []),
    ]


def process_start(pid: object) -> str | None:
    """When process ``pid`` started: with its pid, this names one process, however pids are reused.

    None when it is gone, a zombie, or another user's (never ours to stop)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():  # macOS, BSD: ps, to the second
        found = subprocess.run(
            ["ps", "-o", "uid=,stat=,lstart=", "-p", str(pid)], capture_output=True, text=True
        ).stdout.split(maxsplit=2)
        if len(found) < 3 or int(found[0]) != os.getuid() or found[1].startswith("Z"):
            return None
        return found[2].strip()
    try:
        if proc.stat().st_uid != os.getuid():
            return None
        # After the command's parenthesis: field 3 of proc(5), the state, ... field 22, the start time.
        fields = (proc / "stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields[19]


def pid_alive(pid: object) -> bool:
    """Whether ``pid`` is a live process of this user's (a zombie counts as gone; nothing is reaped)."""
    return process_start(pid) is not None


def _same_process(pid: object, started: object) -> bool:
    return started is not None and process_start(pid) == started


class _Lock:
    """The exclusive flock on stack.lock. The supervisor holds it while it lives (the kernel drops it
    when the last process holding the open file exits); a `joey up` or `joey down` clearing a stale
    state holds it meanwhile, and a detaching `joey up` until its supervisor takes it over."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def record(self, command: str) -> None:
        """Name this process in the lock file: `joey down` stops only the process the lock names."""
        me = {"pid": os.getpid(), "started": process_start(os.getpid()), "command": command}
        text = json.dumps(me).encode()
        os.pwrite(self.fd, text, 0)
        os.ftruncate(self.fd, len(text))  # what an earlier, longer name left after it

    def release(self) -> None:
        os.close(self.fd)


class StackDir:
    """The files of the one stack a state directory holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_file = path / "stack.json"
        self.lock_file = path / "stack.lock"
        self.logs = path / "logs"
        self.up_log = path / "up.log"

    def _try_lock(self) -> _Lock | None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _Lock(fd)

    def lock(self, command: str) -> _Lock | None:
        """The lock, taken and named after this process (running ``command``); None while another
        process holds it."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while (lock := self._try_lock()) is None:
            # Refused at once when a holder has named itself. Otherwise it may be a held() probe, gone in
            # a moment, or a process that has not named itself yet: ask again for a while.
            if self.holder() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        lock.record(command)
        return lock

    def adopt(self, fd: int) -> _Lock:
        """The lock a detaching `joey up` handed over (already held), named after this process."""
        try:
            handed = os.path.samestat(os.fstat(fd), self.lock_file.stat())
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op when it is the held lock
        except OSError:
            handed = False
        if not handed:
            raise StackError(
                f"JOEY_STACK_LOCK_FD={fd} is not {self.lock_file}, held: it is set by `joey up --detach` "
                "for the supervisor it starts; unset it"
            )
        lock = _Lock(fd)
        lock.record("up")
        return lock

    def held(self) -> bool:
        """Whether some process holds the lock. Probed with a shared lock for a moment: a claim that
        meets the probe asks again (lock())."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def holder(self) -> dict[str, Any] | None:
        """The process holding the lock, as it named itself; None when none holds it, or the holder has
        not named itself yet (the file may still name an earlier holder, gone or no longer holding)."""
        if not self.held():
            return None
        try:
            named = json.loads(self.lock_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if isinstance(named, dict) and _same_process(named.get("pid"), named.get("started")):
            return named
        return None

    def read(self) -> State | None:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            click.echo(f"Warning: ignoring {self.state_file}: not the JSON `joey up` writes", err=True)
            return None

    def write(self, state: State) -> None:
        # Replaced whole, so a reader never sees half a file.
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(state))
        partial.replace(self.state_file)

    def remove(self) -> None:
        self.state_file.unlink(missing_ok=True)

    def running(self) -> State | None:
        """The running stack's state; None when no process holds the lock.

        ``stack.json`` counts only when its pid is the holder's: before the holder writes its own, the
        file may be a stale one. Until then the state is the holder's pid and ``starting`` (or
        ``stopping`` when the holder is a `joey down` clearing a stale state)."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while (holder := self.holder()) is None:
            if not self.held():
                return None
            if time.monotonic() > deadline:
                return {"pid": None, "status": "starting"}
            time.sleep(0.02)  # the holder names itself right after taking the lock
        state = self.read()
        if state is not None and state.get("pid") == holder["pid"]:
            return state
        return {"pid": holder["pid"], "status": "starting" if holder.get("command") == "up" else "stopping"}

    def clear_stale(self) -> str | None:
        """With the lock held: stop what a supervisor that died without stopping left, and forget it.

        What was done, or None when no state was left."""
        state = self.read()
        if state is None:
            return None
        started = state.get("started", {})
        # The services newest first, then the broker they used: the order LocalStack.stop keeps.
        named = [*reversed(state.get("services", {}).items()), ("broker", state.get("broker"))]
        left = [(name, pid) for name, pid in named if _same_process(pid, started.get(name))]
        for name, pid in left:
            _terminate(pid, BROKER_STOP_S if name == "broker" else SERVICE_STOP_S)
        self.remove()
        done = f"the stack of pid {state.get('pid')} had exited without stopping"
        if left:
            return f"{done}: stopped what it left, " + ", ".join(f"{n} (pid {p})" for n, p in left)
        return f"{done}; removed its state {self.state_file}"


def _terminate(pid: int, timeout: float) -> None:
    """Stop a process the stack started, with its session: each leads one, and what it started goes too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def claim(files: StackDir, say: Callable[[str], None]) -> _Lock:
    """The stack's lock, refused while another stack runs; a stale stack's leftovers are stopped."""
    lock = files.lock("up")
    if lock is None:
        raise AlreadyRunning(files.running() or {"pid": None})
    try:
        if (cleared := files.clear_stale()) is not None:
            say(cleared)
    except BaseException:
        lock.release()
        raise
    return lock


def _wait(predicate: Callable[[], bool], timeout: float, what: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if stop.is_set():
            raise StackError(f"interrupted while waiting for {what}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def registry_ready(addr: str, settings: CommonSettings | None = None) -> bool:
    """Whether the registry at ``addr`` answers; over TLS when ``settings`` say so (none: plaintext)."""
    import grpc

    from joey_core import tls
    from joey_core.v1 import registry_pb2, registry_pb2_grpc

    try:
        with tls.channel(addr, settings) if settings else grpc.insecure_channel(addr) as channel:
            registry_pb2_grpc.RegistryStub(channel).WhoAmI(registry_pb2.WhoAmIRequest(), timeout=2)
        return True
    except grpc.RpcError as exc:
        # Asked without a token: refusing it is the registry answering.
        return bool(exc.code() == grpc.StatusCode.UNAUTHENTICATED)


def _reason(exc: BaseException, settings: StackSettings) -> str:
    """The first line of a client library's error, without the secrets it might quote."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return redaction.scrub(first, redaction.secrets_of(settings))


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
                [sys.executable, "-P", "-m", module(self.name)],
                env=self.env | {"JOEY_INSTANCE_ID": self.instance_id},
                stdin=subprocess.DEVNULL,
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

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVICE_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", self.name, SERVICE_STOP_S)
                self.process.kill()
                self.process.wait()


@dataclass
class LocalStack:
    settings: StackSettings
    say: Callable[[str], None] = print
    broker: EmbeddedBroker | None = None
    services: list[_Service] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    login: str = ""
    """Who `joey up` logged in (see joey_cli.local_login), once the registry is ready."""

    @property
    def files(self) -> StackDir:
        return StackDir(self.settings.state_dir)

    def state(self, status: str) -> State:
        s = self.settings
        services = {svc.name: svc.process.pid for svc in self.services if svc.process}
        broker = self.broker.process.pid if self.broker and self.broker.process else None
        processes = {**services, "broker": broker} if broker else services
        return {
            "status": status,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "kafka_bootstrap": s.kafka_bootstrap,
            "embedded": s.embedded,
            "registry_addr": s.registry_addr,
            "oip_http_addr": s.oip_http_addr,
            "oip_grpc_addr": s.oip_grpc_addr,
            "logs": str(self.files.logs),
            "login": self.login,
            "services": services,
            "broker": broker,
            # With the pids: a stale state's leftovers are stopped only if they are still these processes.
            "started": {name: process_start(pid) for name, pid in processes.items()},
        }

    def _write_state(self, status: str) -> None:
        self.files.write(self.state(status))

    def _check_prerequisites(self) -> None:
        """Redis and Postgres answer, before anything starts: the error says which and what to do."""
        import psycopg
        import redis

        from joey_core import db

        s = self.settings
        # Refused up front: a service that cannot bind its port would only show up as a timeout.
        addresses = {
            "registry": s.registry_addr,
            "gateway REST": s.oip_http_addr,
            "gateway gRPC": s.oip_grpc_addr,
        }
        taken = [f"{what} {addr}" for what, addr in addresses.items() if listening(addr)]
        if taken:
            raise StackError(
                f"{', '.join(taken)} already in use by another process (a stack with another "
                "JOEY_STATE_DIR?): stop it, or set JOEY_REGISTRY_ADDR / JOEY_OIP_HTTP_ADDR / "
                "JOEY_OIP_GRPC_ADDR"
            )
        if s.embedded and listening(s.kafka_bootstrap):
            raise StackError(
                f"{s.kafka_bootstrap} is already in use by another process (a stack with another "
                "JOEY_STATE_DIR, or a Kafka broker): stop it, or set JOEY_KAFKA_BOOTSTRAP to use "
                "a running Kafka cluster"
            )
        redis_url, database_url = s.redis_url.get_secret_value(), s.database_url.get_secret_value()
        try:
            redis.Redis.from_url(redis_url).ping()
        except redis.RedisError as exc:
            raise StackError(
                f"cannot reach Redis at {redaction.url(redis_url)} ({_reason(exc, s)}): "
                "start it, or set JOEY_REDIS_URL"
            ) from None
        self.say("preparing the Postgres database")
        try:
            db.prepare(database_url)
        except psycopg.OperationalError as exc:
            raise StackError(
                f"cannot reach Postgres at {redaction.url(database_url)} ({_reason(exc, s)}): "
                "start it, or set JOEY_DATABASE_URL"
            ) from None

    def _start_kafka(self) -> None:
        from joey_cli.broker import EmbeddedBroker
        from joey_core.kafka import (
            admin_client,
            client_config,
            ensure_topics,
            platform_topics,
            wait_for_broker,
        )

        s = self.settings
        if s.embedded:
            self.say(f"starting embedded Kafka-compatible broker on {s.kafka_bootstrap}")
            _, _, port = s.kafka_bootstrap.rpartition(":")
            log_path = self.files.logs / "broker.log"
            try:
                self.broker = EmbeddedBroker(int(port), log_path).start()
            except FileNotFoundError as exc:
                raise StackError(f"cannot start the embedded broker: {exc}") from None
            except TimeoutError as exc:
                raise StackError(f"the embedded broker did not start ({exc}); see {log_path}") from None
        else:
            self.say(f"using Kafka at {s.kafka_bootstrap}")
            try:
                wait_for_broker(client_config(s))
            except TimeoutError as exc:
                raise StackError(
                    f"cannot reach Kafka at {s.kafka_bootstrap} ({exc}): start it, or unset "
                    "JOEY_KAFKA_BOOTSTRAP to have `joey up` start the embedded broker"
                ) from None
        self.say("creating Kafka topics")
        ensure_topics(admin_client(s), platform_topics(s))

    def start(self, stop: threading.Event) -> None:
        # Imported here: `joey status` and `joey down` read the state without loading Kafka and numpy.
        import redis

        from joey_cli.local_login import log_in_admin
        from joey_core import heartbeats

        s = self.settings
        self.files.logs.mkdir(parents=True, exist_ok=True)
        self._write_state("starting")
        self._check_prerequisites()
        self._start_kafka()
        env = settings_env(s)
        self.services = [
            _Service(
                name,
                self.files.logs / f"{name}.log",
                service_env(env, name) | bootstrap.service_env(name, s.state_dir),
            )
            for name in SERVICES
        ]
        registry, *workers = self.services
        registry.start()
        self._write_state("starting")
        self.say(f"starting registry on {s.registry_addr}")

        def registry_up() -> bool:
            registry.check_running()
            return registry_ready(s.registry_addr, s)

        _wait(registry_up, s.ready_timeout_s, "registry", stop)
        self.login = log_in_admin(s.registry_addr, bootstrap.admin_password(s.state_dir), settings=s)
        for service in workers:
            self.say(f"starting {service.name}")
            service.start()
        self._write_state("starting")
        client = redis.Redis.from_url(s.redis_url.get_secret_value())
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
        """Services newest first, then the broker; said only when something was started."""
        started = [service for service in reversed(self.services) if service.process]
        if started or self.broker:
            self.say("stopping Joey")
            for service in started:
                service.stop()
            if self.broker:
                self.broker.stop()
            self.say("stopped")
        self.files.remove()


def run_foreground(settings: StackSettings, say: Callable[[str], None] = print) -> None:
    """`joey up`: start, supervise until Ctrl-C / SIGTERM, stop."""
    from joey_core.lifecycle import harden_process, shutdown_event

    # Before any child starts: this process's environment is the user's shell's (the admin password, the
    # service token, cloud keys), readable in /proc by every process of the user, tasks included.
    harden_process()
    stop = shutdown_event()
    files = StackDir(settings.state_dir)
    lock = files.adopt(settings.stack_lock_fd) if settings.stack_lock_fd is not None else claim(files, say)
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
    """`joey up --detach`: run the stack in a background process and return its state once it is ready.

    The lock is taken here, so that a second `joey up` is refused before anything starts, and handed to
    the supervisor, so that no other `joey up` can take it in between."""
    from joey_core.lifecycle import harden_process, shutdown_event

    harden_process()  # as the supervisor does: it has the same environment, and lives as long as it starts
    files = StackDir(settings.state_dir)
    lock = claim(files, say)
    try:
        # Emptied: while the lock is ours, it is the output of this stack's supervisor alone.
        with files.up_log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-P", "-u", "-m", "joey_cli", "up"],
                env=settings_env(settings) | {"JOEY_STACK_LOCK_FD": str(lock.fd)},
                pass_fds=(lock.fd,),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        lock.release()  # the supervisor holds it now; `joey down` stops it by stopping us meanwhile
    stop = shutdown_event()
    deadline = time.monotonic() + settings.ready_timeout_s + 30
    try:
        while not stop.wait(0.1):
            if process.poll() is not None:
                raise StackError(_failure(files.up_log, process))
            state = files.read()
            if state and state.get("status") == "ready" and state.get("pid") == process.pid:
                return state
            if time.monotonic() > deadline:
                raise StackError(f"Joey was not ready in time and was stopped; see {files.up_log}")
        raise StackError("interrupted: the stack that was starting was stopped")
    except BaseException:
        if process.poll() is None:
            process.terminate()
            process.wait()
        raise


def _failure(up_log: Path, process: subprocess.Popen[bytes]) -> str:
    """Why a detached supervisor exited: its own `Error:` message, else its exit code; and where its
    output is."""
    lines = up_log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    if starts:
        reason = "\n".join(lines[starts[-1] :]).removeprefix("Error: ")
    else:
        reason = f"`joey up` (pid {process.pid}) exited with code {process.returncode}"
    return f"{reason}\n(the whole output of `joey up`: {up_log})"


def stop_detached(settings: StackSettings) -> str:
    """`joey down`: stop the stack of this state directory; the line saying what was done."""
    files = StackDir(settings.state_dir)
    state = files.running()
    if state is None and (lock := files.lock("down")) is not None:
        try:
            cleared = files.clear_stale()
        finally:
            lock.release()
        return "Joey was not running" + (f"; {cleared}" if cleared else "")
    state = state or files.running()  # a `joey up` took the lock in between
    if state is None:
        return "Joey was not running"
    pid = state["pid"]
    if pid is None:
        raise StackError(
            f"a process holds {files.lock_file} without naming itself: is it a `joey up`? "
            "Try again, or see `joey status`"
        )
    if state["status"] == "stopping":
        raise StackError(f"another `joey down` (pid {pid}) is stopping what a stack left; see `joey status`")
    # The lock's holder, named by pid and start time (holder()): whatever stack.json says.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_WAIT_S
    while files.held() or pid_alive(pid):  # it releases the lock just before it exits
        if time.monotonic() > deadline:
            raise StackError(
                f"Joey (pid {pid}) is still stopping after {DOWN_WAIT_S:.0f}s: check `joey status`; its "
                f"logs are in {files.logs}"
            )
        time.sleep(0.1)
    return f"Joey stopped (pid {pid})"


def stack_status(settings: StackSettings) -> tuple[State | None, State | None]:
    """The running stack's state, and the stale state of one that died without stopping."""
    files = StackDir(settings.state_dir)
    running = files.running()
    return running, None if running else files.read()
