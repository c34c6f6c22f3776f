"""The registry running in-process on a free port, against the session's broker, Postgres and Redis."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from tests.registry.helpers import Person, Stub, token_stub


@pytest.fixture(scope="session")
def registry_settings(
    env: dict[str, str], settings: CommonSettings, tmp_path_factory: pytest.TempPathFactory
) -> RegistrySettings:
    # Port 0 and a private artifact dir: a `joey serve registry` process of other tests keeps its own. Redis
    # keys of its own too: the session stack's engine, once started, serves every deployment published and
    # reports its replicas, which must not mix with the heartbeats these tests publish.
    overrides = {
        "registry_addr": "127.0.0.1:0",
        "artifact_dir": str(tmp_path_factory.mktemp("registry-artifacts")),
        "redis_prefix": f"{env['JOEY_REDIS_PREFIX']}:registry-tests",
        # Reconciling is the test's move: a registry of a test, on a broker of its own, leaves intents in
        # this shared database that this one would otherwise settle on the session's broker.
        "reconcile_interval_s": "3600",
    }
    return RegistrySettings(**({k.removeprefix("JOEY_").lower(): v for k, v in env.items()} | overrides))


@pytest.fixture(scope="session")
def registry_server(registry_settings: RegistrySettings) -> Iterator[RegistryServer]:
    server = RegistryServer(registry_settings)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_addr(registry_server: RegistryServer) -> str:
    return f"127.0.0.1:{registry_server.port}"


@pytest.fixture(scope="session")
def channel(registry_addr: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(registry_addr) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel, admin_token: str) -> Stub:
    """The platform admin's stub: every call carries their token."""
    return token_stub(channel, admin_token)


@pytest.fixture(scope="session")
def anonymous_stub(channel: grpc.Channel) -> Stub:
    return registry_pb2_grpc.RegistryStub(channel)


@pytest.fixture(scope="session")
def new_person(stub: Stub, anonymous_stub: Stub, channel: grpc.Channel) -> Callable[..., Person]:
    """Make a user (by the admin) with an API token of their own."""

    def make(admin: bool = False) -> Person:
        username = f"user-{secrets.token_hex(4)}"
        password = f"pw-{secrets.token_urlsafe(12)}"
        stub.CreateUser(pb.CreateUserRequest(username=username, password=password, admin=admin))
        session = anonymous_stub.Login(pb.LoginRequest(username=username, password=password)).token
        request = pb.CreateTokenRequest(name="tests", expires_in_s=3600)
        token = token_stub(channel, session).CreateToken(request).token
        return Person(username, password, token, token_stub(channel, token))

    return make


@pytest.fixture
def workspace(stub: Stub) -> str:
    """A fresh workspace per test, so tests sharing the session database never see each other."""
    name = f"ws-{secrets.token_hex(4)}"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    return name


@pytest.fixture(scope="session")
def iris_bytes(iris_model: Path) -> bytes:
    return iris_model.read_bytes()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
