"""Logins under attack: wrong passwords back off per username and host, and password checks at once
are bounded, so a flood of logins leaves the registry answering other calls."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import grpc

from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from joey_registry.errors import Unauthenticated
from joey_registry.identity import BAD_LOGIN, Identity
from joey_registry.login_guard import BUSY
from tests.conftest import wait_until
from tests.registry.helpers import Person, Stub, rpc_error


def login(anonymous: Stub, person: Person, password: str | None = None) -> pb.LoginResponse:
    return anonymous.Login(pb.LoginRequest(username=person.username, password=password or person.password))


def test_repeated_wrong_passwords_lock_that_username_from_that_host(
    anonymous_stub: Stub, registry_server: RegistryServer, new_person: Callable[..., Person]
) -> None:
    person, other = new_person(), new_person()
    for _ in range(6):
        wrong = rpc_error(lambda: login(anonymous_stub, person, "not-the-password"))
        assert (wrong.code(), wrong.details()) == (grpc.StatusCode.UNAUTHENTICATED, BAD_LOGIN)
    locked = rpc_error(lambda: login(anonymous_stub, person))
    assert (locked.code(), locked.details()) == (grpc.StatusCode.UNAUTHENTICATED, BAD_LOGIN)
    assert login(anonymous_stub, other).user.username == other.username
    elsewhere = registry_server.registry.identity.login(
        person.username, person.password, None, "ipv4:10.1.2.3:4567"
    )
    assert elsewhere[2].username == person.username


def test_the_backoff_ends_and_a_right_password_resets_it(
    registry_server: RegistryServer, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    core = registry_server.registry
    settings = core.settings.model_copy(update={"login_backoff_base_s": 0.001})
    identity = Identity(settings, core.identity.store, core.access, core.redis)
    peer = "ipv4:10.4.5.6:7890"
    for _ in range(6):
        with suppress(Unauthenticated):
            identity.login(person.username, "not-the-password", None, peer)

    def logged_in() -> bool:
        try:
            identity.login(person.username, person.password, None, peer)
        except Unauthenticated:
            return False
        return True

    wait_until(logged_in, 30, "the backoff to end")
    # The count started again: one wrong password does not lock the name.
    with suppress(Unauthenticated):
        identity.login(person.username, "not-the-password", None, peer)
    assert identity.guard.blocked(person.username, "10.4.5.6") is False


def test_change_password_backs_off_too(new_person: Callable[..., Person]) -> None:
    person = new_person()

    def change(old: str) -> grpc.RpcError:
        request = pb.ChangePasswordRequest(old_password=old, new_password="a-brand-new-password")
        return rpc_error(lambda: person.stub.ChangePassword(request))

    for _ in range(5):
        assert change("not-the-password").details() == "current password is wrong"
    locked = change(person.password)
    assert (locked.code(), locked.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "current password is wrong",
    )


def test_busy_password_checks_refuse_logins_and_leave_other_calls_answered(
    anonymous_stub: Stub, registry_server: RegistryServer, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    guard = registry_server.registry.identity.guard
    with guard.hashing(), guard.hashing():  # every slot (login_concurrency is 2)
        busy = rpc_error(lambda: login(anonymous_stub, person))
    assert (busy.code(), busy.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY)

    def attempt(_: int) -> str:
        try:
            login(anonymous_stub, person)
        except grpc.RpcError as exc:
            assert (exc.code(), exc.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY)  # type: ignore[attr-defined]
            return "busy"
        return "ok"

    with ThreadPoolExecutor(max_workers=10) as pool:
        flood = [pool.submit(attempt, n) for n in range(40)]
        answered = 0
        while answered == 0 or not all(f.done() for f in flood):
            assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username
            answered += 1
        outcomes = [f.result() for f in flood]
    assert "ok" in outcomes
