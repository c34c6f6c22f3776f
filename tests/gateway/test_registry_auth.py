"""The gateway's access check against the session's real registry: the caller's token is forwarded, the
registry's refusals come back as they are, a "yes" is reused for at most the cache time and a refusal
never, and a registry that cannot answer refuses all but the callers it authorized within the grace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_gateway.errors import GatewayError, Status
from joey_gateway.registry_auth import RegistryAuth, bearer_token
from tests.conftest import free_port, wait_until
from tests.registry.helpers import Person, Stub


@pytest.fixture(scope="module")
def stub(registry_channel: grpc.Channel) -> registry_pb2_grpc.RegistryStub:
    """No token of its own: RegistryAuth sends its caller's."""
    return registry_pb2_grpc.RegistryStub(registry_channel)


def refused(call: Callable[[], object]) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call()
    return info.value


def test_the_bearer_token_is_read_from_the_header() -> None:
    assert bearer_token("Bearer joey_abc") == "joey_abc"
    assert bearer_token("bearer  joey_abc ") == "joey_abc"
    assert refused(lambda: bearer_token(None)).message.startswith("no token: send the header")
    for malformed in ("joey_abc", "Basic dXNlcjpwdw==", "Bearer ", "Bearer a b", "Bearer jöey"):
        error = refused(lambda value=malformed: bearer_token(value))  # type: ignore[misc]
        assert (error.status, error.message) == (
            Status.UNAUTHENTICATED,
            "malformed Authorization header: expected 'Bearer <token>'",
        ), malformed


def test_the_registry_decides_with_the_callers_token(
    stub: registry_pb2_grpc.RegistryStub,
    admin_token: str,
    workspace: tuple[str, Person],
    new_person: Callable[[], Person],
) -> None:
    name, owner = workspace
    auth = RegistryAuth(stub, cache_s=1.0)
    auth.authenticate(admin_token)
    auth.authorize(admin_token, name, "infer")  # the platform admin sees every workspace
    auth.authorize(owner.token, name, "read")
    auth.authorize(owner.token, name, "infer")

    stranger = new_person()
    auth.authenticate(stranger.token)  # any user passes the server-level routes
    denied = refused(lambda: auth.authorize(stranger.token, name, "infer"))
    missing = refused(lambda: auth.authorize(admin_token, "gw-no-such-workspace", "infer"))
    # A non-member learns nothing: the answer is the one for a workspace that does not exist.
    assert (denied.status, denied.message) == (Status.NOT_FOUND, f"workspace {name!r} not found")
    assert (missing.status, missing.message) == (
        Status.NOT_FOUND,
        "workspace 'gw-no-such-workspace' not found",
    )

    for call in (
        lambda: auth.authenticate("joey_not-a-token"),
        lambda: auth.authorize("joey_x", name, "read"),
    ):
        assert refused(call).status == Status.UNAUTHENTICATED


def test_a_refusal_is_never_reused(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person], new_person: Callable[[], Person]
) -> None:
    name, owner = workspace
    auth = RegistryAuth(stub, cache_s=1.0)
    newcomer = new_person()
    assert refused(lambda: auth.authorize(newcomer.token, name, "infer")).status == Status.NOT_FOUND
    owner.stub.AddWorkspaceMember(pb.AddWorkspaceMemberRequest(workspace=name, username=newcomer.username))
    auth.authorize(newcomer.token, name, "infer")  # at once: the refusal was not kept


def test_a_revoked_token_is_refused_once_its_answer_expires(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person]
) -> None:
    name, owner = workspace
    auth = RegistryAuth(stub, cache_s=1.0)
    auth.authorize(owner.token, name, "infer")
    owner.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))

    def refused_now() -> bool:
        try:
            auth.authorize(owner.token, name, "infer")
        except GatewayError as exc:
            return exc.status == Status.UNAUTHENTICATED
        return False

    wait_until(refused_now, 30, "the revoked token refused")


def test_a_token_is_known_only_while_its_authentication_answer_is_reused(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person], new_person: Callable[[], Person]
) -> None:
    """known() lets a transport skip the worker thread for a caller the registry said yes to: only a "yes"
    to authenticate that authenticate would reuse; never one to authorize, never a refusal, never past the
    cache time (the revoked token is refused once known() stops vouching for it)."""
    name, owner = workspace
    # A cache that outlasts the test: known() right after authenticate does not race its expiry.
    auth = RegistryAuth(stub, cache_s=3600, outage_grace_s=30)
    expiring = RegistryAuth(stub, cache_s=0.5, outage_grace_s=30)
    assert not auth.known(owner.token)
    auth.authorize(owner.token, name, "infer")
    assert not auth.known(owner.token)  # a workspace's "yes" is not the server-level one
    auth.authenticate(owner.token)
    assert auth.known(owner.token)
    assert not auth.known("joey_not-a-token")
    assert refused(lambda: auth.authenticate("joey_not-a-token")).status == Status.UNAUTHENTICATED
    assert not auth.known("joey_not-a-token")
    expiring.authenticate(owner.token)
    owner.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))
    assert auth.known(owner.token)  # the cached "yes" stands for its cache time, revoked or not
    wait_until(lambda: not expiring.known(owner.token), 30, "the answer expired")
    assert refused(lambda: expiring.authenticate(owner.token)).status == Status.UNAUTHENTICATED
    assert not expiring.known(owner.token)
    # Without a cache, a "yes" kept only for the outage grace vouches for nothing.
    uncached, other = RegistryAuth(stub, cache_s=0, outage_grace_s=30), new_person().token
    uncached.authenticate(other)
    assert not uncached.known(other)


def test_without_a_cache_a_deactivated_user_is_refused_at_once(
    stub: registry_pb2_grpc.RegistryStub, admin_stub: Stub, workspace: tuple[str, Person]
) -> None:
    name, owner = workspace
    auth = RegistryAuth(stub, cache_s=0)
    auth.authorize(owner.token, name, "read")
    admin_stub.SetUserActive(pb.SetUserActiveRequest(username=owner.username, active=False))
    assert refused(lambda: auth.authorize(owner.token, name, "read")).status == Status.UNAUTHENTICATED
    assert refused(lambda: auth.authenticate(owner.token)).status == Status.UNAUTHENTICATED


def test_the_cache_keeps_only_the_newest_answers(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person]
) -> None:
    """Bounded: beyond ``max_cached`` the oldest answer goes, so its next call asks the registry again."""
    name, owner = workspace
    auth = RegistryAuth(stub, cache_s=1.0, max_cached=1)
    auth.authorize(owner.token, name, "read")
    auth.authorize(owner.token, name, "infer")  # the "read" answer is dropped
    owner.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))
    assert refused(lambda: auth.authorize(owner.token, name, "read")).status == Status.UNAUTHENTICATED


def test_a_registry_that_cannot_answer_refuses(admin_token: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        auth = RegistryAuth(registry_pb2_grpc.RegistryStub(channel), cache_s=1.0)
        for call in (
            lambda: auth.authorize(admin_token, "default", "infer"),
            lambda: auth.authenticate(admin_token),
        ):
            error = refused(call)
            assert error.status == Status.UNAVAILABLE and error.message.startswith("registry unavailable: ")


class _Switchable:
    """The registry's stub until ``down`` is set, then one of a port where nothing listens."""

    def __init__(self, up: registry_pb2_grpc.RegistryStub, down: registry_pb2_grpc.RegistryStub) -> None:
        self._up, self._down = up, down
        self.is_down = False
        self.asked = 0

    def __getattr__(self, name: str) -> Any:
        self.asked += 1
        return getattr(self._down if self.is_down else self._up, name)


def test_while_the_registry_cannot_answer_only_callers_it_recently_authorized_are_served(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person], new_person: Callable[[], Person]
) -> None:
    name, owner = workspace
    other = new_person()
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        registry = _Switchable(stub, registry_pb2_grpc.RegistryStub(channel))
        auth = RegistryAuth(cast(registry_pb2_grpc.RegistryStub, registry), cache_s=0, outage_grace_s=30)
        auth.authorize(owner.token, name, "infer")
        auth.authenticate(other.token)
        registry.is_down = True
        auth.authorize(owner.token, name, "infer")  # asked (no cache), could not answer: the grace
        auth.authenticate(other.token)
        for call in (
            lambda: auth.authorize(owner.token, name, "read"),  # never granted
            lambda: auth.authorize(other.token, name, "infer"),
        ):
            assert refused(call).status == Status.UNAVAILABLE
        registry.is_down = False

        def decided_afresh() -> bool:
            # Asked again once the quiet after the outage ends: the other user is no member.
            return refused(lambda: auth.authorize(other.token, name, "infer")).status == Status.NOT_FOUND

        wait_until(decided_afresh, 30, "the registry asked again")


def test_a_token_refused_after_its_grant_is_not_served_by_the_grace(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person]
) -> None:
    """The registry said yes, then (the token revoked) no: the refusal erases the yes, so when the registry
    then goes down the grace has nothing to serve the token on, in any workspace or for any action."""
    name, owner = workspace
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        registry = _Switchable(stub, registry_pb2_grpc.RegistryStub(channel))
        auth = RegistryAuth(cast(registry_pb2_grpc.RegistryStub, registry), cache_s=0, outage_grace_s=30)
        auth.authorize(owner.token, name, "infer")
        auth.authorize(owner.token, name, "read")
        auth.authenticate(owner.token)
        owner.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))
        assert refused(lambda: auth.authorize(owner.token, name, "infer")).status == Status.UNAUTHENTICATED
        registry.is_down = True
        for call in (
            lambda: auth.authorize(owner.token, name, "infer"),
            lambda: auth.authorize(owner.token, name, "read"),  # not asked since: gone with the token
            lambda: auth.authenticate(owner.token),
        ):
            assert refused(call).status == Status.UNAVAILABLE


def test_a_non_members_refusal_erases_that_grant_only(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person], new_person: Callable[[], Person]
) -> None:
    name, owner = workspace
    member = new_person()
    owner.stub.AddWorkspaceMember(pb.AddWorkspaceMemberRequest(workspace=name, username=member.username))
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        registry = _Switchable(stub, registry_pb2_grpc.RegistryStub(channel))
        auth = RegistryAuth(cast(registry_pb2_grpc.RegistryStub, registry), cache_s=0, outage_grace_s=30)
        auth.authorize(member.token, name, "infer")
        auth.authenticate(member.token)
        owner.stub.RemoveWorkspaceMember(
            pb.RemoveWorkspaceMemberRequest(workspace=name, username=member.username)
        )
        assert refused(lambda: auth.authorize(member.token, name, "infer")).status == Status.NOT_FOUND
        registry.is_down = True
        assert refused(lambda: auth.authorize(member.token, name, "infer")).status == Status.UNAVAILABLE
        auth.authenticate(member.token)  # still a valid user: that yes stands for the grace


def test_the_grace_ends(stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person]) -> None:
    name, owner = workspace
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        registry = _Switchable(stub, registry_pb2_grpc.RegistryStub(channel))
        auth = RegistryAuth(cast(registry_pb2_grpc.RegistryStub, registry), cache_s=0, outage_grace_s=1)
        auth.authorize(owner.token, name, "infer")
        registry.is_down = True

        def refused_now() -> bool:
            try:
                auth.authorize(owner.token, name, "infer")
            except GatewayError as exc:
                return exc.status == Status.UNAVAILABLE
            return False

        wait_until(refused_now, 30, "the grace over")


def test_a_registry_that_cannot_answer_is_not_asked_again_at_once(
    stub: registry_pb2_grpc.RegistryStub, workspace: tuple[str, Person], new_person: Callable[[], Person]
) -> None:
    """One request learns the registry cannot answer; the next ones within the quiet time are answered without
    asking it (the grace, or 503)."""
    name, owner = workspace
    stranger = new_person()
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        registry = _Switchable(stub, registry_pb2_grpc.RegistryStub(channel))
        auth = RegistryAuth(
            cast(registry_pb2_grpc.RegistryStub, registry), cache_s=0, outage_grace_s=60, quiet_s=60
        )
        auth.authorize(owner.token, name, "infer")
        registry.is_down = True
        auth.authorize(owner.token, name, "infer")
        asked = registry.asked
        auth.authorize(owner.token, name, "infer")
        assert refused(lambda: auth.authenticate(stranger.token)).status == Status.UNAVAILABLE
        assert registry.asked == asked
