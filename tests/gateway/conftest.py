"""Users of the session's registry for the gateway's access tests, each with an API token of their own."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import grpc
import pytest

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from tests.conftest import Stack
from tests.registry.helpers import Person, Stub, token_stub


@pytest.fixture(scope="session")
def registry_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.env["JOEY_REGISTRY_ADDR"]) as channel:
        yield channel


@pytest.fixture(scope="session")
def admin_stub(registry_channel: grpc.Channel, admin_token: str) -> Stub:
    return token_stub(registry_channel, admin_token)


@pytest.fixture(scope="session")
def new_person(admin_stub: Stub, registry_channel: grpc.Channel) -> Callable[[], Person]:
    """Make a user (by the platform admin), logged in, with an API token named "tests"."""

    def make() -> Person:
        username = f"gw-{secrets.token_hex(4)}"
        password = f"pw-{secrets.token_urlsafe(12)}"
        admin_stub.CreateUser(pb.CreateUserRequest(username=username, password=password))
        anonymous = registry_pb2_grpc.RegistryStub(registry_channel)
        session = anonymous.Login(pb.LoginRequest(username=username, password=password)).token
        token = token_stub(registry_channel, session).CreateToken(pb.CreateTokenRequest(name="tests")).token
        return Person(username, password, token, token_stub(registry_channel, token))

    return make


@pytest.fixture
def workspace(new_person: Callable[[], Person]) -> tuple[str, Person]:
    """A fresh workspace and its owner."""
    owner = new_person()
    name = f"gw-{secrets.token_hex(4)}"
    owner.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    return name, owner
