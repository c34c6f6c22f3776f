"""Session fixtures: the real embedded broker, a fresh Postgres database, Redis, and Joey
services as separate processes. Readiness is always awaited, never slept for."""

from __future__ import annotations

import base64
import gc
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from joey_cli.broker import EmbeddedBroker
from joey_cli.stack import registry_ready
from joey_core import db, heartbeats
from joey_core.kafka import admin_client, ensure_topics, platform_topics
from joey_core.settings import CommonSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Fresh per session, so a test that finds one stored in plain text finds this session's.
ADMIN_PASSWORD = f"admin-{secrets.token_urlsafe(16)}"
SERVICE_TOKEN = f"joey_{secrets.token_urlsafe(32)}"
SECRET_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
"""A Fernet key: the registries of the session seal connection secrets with it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run engines of their own go first. The `stack` fixture's engine serves every workspace
    and finds models in its cache by sha256, so once it runs it would join their pipelines' consumer
    groups (they publish to the same joey.deployments) and take partitions their assertions expect."""
    engine_tests = Path(__file__).parent / "engine"
    items.sort(key=lambda item: not item.path.is_relative_to(engine_tests))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(free_port(), log_path).start()
    try:
        yield b
        # Kafka clients that tests left for the garbage collector reconnect while they are torn down: let
        # that happen while the broker still answers, rather than as refused connections after the summary.
        gc.collect()
    finally:
        kill_broker(b)


def kill_broker(broker: EmbeddedBroker) -> None:
    """Stop ``broker`` at once. On SIGTERM the embedded broker gives the connections still open 5 s to
    close; it holds everything in memory, so there is nothing a graceful stop would keep."""
    if broker.process is not None:
        broker.process.kill()
        broker.process.wait()
        broker.process = None


@contextmanager
def scratch_database(prefix: str, up_to: int | None = None) -> Iterator[str]:
    """A fresh database with a random name, migrated (up to migration ``up_to`` if given), dropped
    afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    db.ensure_database(url)
    db.migrate(url, up_to)
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with scratch_database("joey_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    prefix = f"joeytest{secrets.token_hex(4)}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = client.keys(f"{prefix}:*")
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def env(
    broker: EmbeddedBroker, database_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """JOEY_* variables of one isolated stack; services and clients of a test session share them."""
    data = tmp_path_factory.mktemp("joey-data")
    return {
        "JOEY_KAFKA_BOOTSTRAP": broker.bootstrap,
        "JOEY_DATABASE_URL": database_url,
        "JOEY_REDIS_URL": REDIS_URL,
        "JOEY_REDIS_PREFIX": redis_prefix,
        "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
        "JOEY_ARTIFACT_DIR": str(data / "artifacts"),
        "JOEY_CACHE_DIR": str(data / "cache"),
        "JOEY_PIPELINE_PARTITIONS": "4",
        "JOEY_LOGS_PARTITIONS": "4",
        # A hung python step costs a test this long; the tests' steps take milliseconds.
        "JOEY_PYTHON_STEP_TIMEOUT_S": "3",
        "JOEY_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "JOEY_SERVICE_TOKEN": SERVICE_TOKEN,
        "JOEY_SECRET_KEY": SECRET_KEY,
    }


@pytest.fixture(scope="session", autouse=True)
def credentials_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """JOEY_CREDENTIALS of the session (and of every process it starts): `joey up` and `joey login` in
    tests store their tokens there, never in the user's ~/.config/joey/credentials."""
    path = tmp_path_factory.mktemp("config") / "joey" / "credentials"
    previous = os.environ.get("JOEY_CREDENTIALS")
    os.environ["JOEY_CREDENTIALS"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("JOEY_CREDENTIALS", None)
    else:
        os.environ["JOEY_CREDENTIALS"] = previous


@pytest.fixture(scope="session", autouse=True)
def admin_token(database_url: str, redis_prefix: str) -> Iterator[str]:
    """An API token of the platform admin, in JOEY_TOKEN for every SDK and CLI call of the session.

    Made by the registry's own identity core on the session database, which every registry of the
    session (in-process or `joey serve registry`) serves: it bootstraps `admin` exactly as a registry
    starting on an empty database does, logs in and creates the token, without waiting for one."""
    from joey_registry.access import Access
    from joey_registry.identity import Identity
    from joey_registry.identity_store import IdentityStore
    from joey_registry.settings import RegistrySettings
    from joey_registry.store import Store

    settings = RegistrySettings(
        database_url=database_url,
        admin_password=ADMIN_PASSWORD,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
    )
    store = Store(database_url, max_size=1)
    store.open()
    try:
        client = redis.Redis.from_url(REDIS_URL)
        identity = Identity(settings, IdentityStore(store.pool), Access(store), client)
        identity.bootstrap()
        session, _, _ = identity.login("admin", ADMIN_PASSWORD, None)
        caller = identity.resolve([("authorization", f"Bearer {session}")])
        # A token made with a session expires with it at the latest: a test session is far shorter.
        lifetime = settings.session_ttl_s - 60
        token, _ = identity.create_token(caller, f"tests-{secrets.token_hex(4)}", lifetime)
        identity.logout(caller)
    finally:
        store.close()
    previous = os.environ.get("JOEY_TOKEN")
    os.environ["JOEY_TOKEN"] = token
    yield token
    if previous is None:
        os.environ.pop("JOEY_TOKEN", None)
    else:
        os.environ["JOEY_TOKEN"] = previous


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> CommonSettings:
    settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in env.items() if k.isupper()})
    ensure_topics(admin_client(settings), platform_topics(settings))
    return settings


@dataclass
class ServiceProcess:
    """One `joey serve <name>` process with its own log file."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> ServiceProcess:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", f"joey_{self.name}"],
                env=os.environ | self.env | self.extra_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        if not self.process:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None


def wait_registry_ready(addr: str, timeout: float = 60.0) -> None:
    wait_until(lambda: registry_ready(addr), timeout, f"registry at {addr}", interval=0.1)


def wait_service_ready(env: dict[str, str], service: str, count: int = 1, timeout: float = 60.0) -> None:
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])
    prefix = env["JOEY_REDIS_PREFIX"]
    wait_until(
        lambda: len(heartbeats.live_services(client, prefix, service)) >= count,
        timeout,
        f"{service} ready",
        0.1,
    )


SHORT_GROUP_SESSION = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 250}
"""librdkafka settings of the services the tests start (see `stack`): half the production session, as many
heartbeats in it; a killed replica's (or logger's, or assayer's) partitions also move on after 2 s instead
of 4. The broker holds a group's rounds for at least 1 s whatever the session: shorter gains nothing."""

ENGINE_HEARTBEATS = {"JOEY_HEARTBEAT_INTERVAL_S": "0.5", "JOEY_HEARTBEAT_TTL_S": "3"}
"""Heartbeats of the engines the tests start, as the engine tests' in-process engine has them: every 0.5 s,
living 3 s instead of 5, so the slot leases and replicas of a killed engine are free or shown dead 2 s
sooner."""


@pytest.fixture(scope="session")
def service_factory(
    env: dict[str, str], settings: CommonSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start `joey serve <name>` processes; every one still running is stopped at session end. Each gets
    SHORT_GROUP_SESSION unless the test sets JOEY_KAFKA_CONFIG itself: the engine's replicas, the logger
    and the assayer consume in groups, and a logger or assayer started after a kill -9 waits out the dead
    member's session before it takes its partitions. Engines get ENGINE_HEARTBEATS unless the test sets
    their own."""
    started: list[ServiceProcess] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(name: str, **extra_env: str) -> ServiceProcess:
        defaults = {"JOEY_KAFKA_CONFIG": json.dumps(SHORT_GROUP_SESSION)}
        if name == "engine":
            defaults |= ENGINE_HEARTBEATS
        extra_env = defaults | extra_env
        service = ServiceProcess(name, env, logs / f"{name}-{len(started)}.log", extra_env=extra_env).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@dataclass
class Stack:
    env: dict[str, str]
    registry: ServiceProcess
    engine: ServiceProcess
    logger: ServiceProcess


@pytest.fixture(scope="session")
def stack(env: dict[str, str], service_factory: Callable[..., ServiceProcess]) -> Stack:
    """Registry, engine and logger running as separate processes against the session's broker.

    Test-only settings, for shorter waits the production defaults are right to take: the registry's
    autoscaler looks every 0.5 s (autoscaling tests wait for its decisions), and the engine's replicas
    join their groups with SHORT_GROUP_SESSION, 2 s with 8 heartbeats as the default 4 s: the broker holds
    every join and rebalance of a group for half the session timeout, so each deploy, rollout, undeploy
    and crash takeover of the stack waits 1 s instead of 2 per round (measured: 2.0 s -> 1.0 s to join,
    3.0 s -> 2.0 s for a second member, 2.5 s -> 1.3 s to rebalance when one leaves). The engine beats
    with ENGINE_HEARTBEATS."""
    registry = service_factory("registry", JOEY_AUTOSCALE_INTERVAL_S="0.5")
    wait_registry_ready(env["JOEY_REGISTRY_ADDR"])
    engine = service_factory("engine")
    logger = service_factory("logger")
    wait_service_ready(env, "engine")
    wait_service_ready(env, "logger")
    return Stack(env, registry, engine, logger)


@pytest.fixture(scope="session")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example classifier, trained locally on scikit-learn's bundled iris data and exported to ONNX."""
    from train_model import train_and_export

    return train_and_export(tmp_path_factory.mktemp("model") / "iris.onnx")
