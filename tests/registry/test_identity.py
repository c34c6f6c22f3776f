"""Users, passwords, tokens and sessions, through the registry's gRPC API; the bootstrap of the
platform admin on an empty and on an upgraded database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from joey_core import db as migrations
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry.access import Access
from joey_registry.app import RegistryServer
from joey_registry.errors import FailedPrecondition
from joey_registry.identity import BootstrapRefused, Identity, token_sha256
from joey_registry.identity_store import IdentityStore
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store
from tests.conftest import (
    ADMIN_PASSWORD,
    REDIS_URL,
    SERVICE_TOKEN,
    ServiceProcess,
    scratch_database,
    wait_until,
)
from tests.registry.helpers import (
    Person,
    Stub,
    identity_model,
    registry_on,
    rpc_error,
    step,
    token_stub,
    upload,
)

BAD_LOGIN = "invalid username or password"


def login(anonymous: Stub, username: str, password: str, **kwargs: int) -> pb.LoginResponse:
    return anonymous.Login(pb.LoginRequest(username=username, password=password, **kwargs))


def test_login_gives_a_session_token(
    anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    before = datetime.now(UTC)
    reply = login(anonymous_stub, person.username, person.password)
    assert reply.token.startswith("joey_") and len(reply.token) > 40
    assert reply.user.username == person.username and not reply.user.admin and reply.user.active
    lifetime = reply.expires_at.ToDatetime(tzinfo=UTC) - before
    assert timedelta(hours=11, minutes=59) < lifetime <= timedelta(hours=12, seconds=5)
    assert token_stub(channel, reply.token).WhoAmI(pb.WhoAmIRequest()).username == person.username
    sessions = [t for t in person.stub.ListTokens(pb.ListTokensRequest()).tokens if t.kind == "session"]
    assert len(sessions) == 2  # the one new_person logged in with, and this one


def test_unknown_user_wrong_password_and_deactivated_user_get_the_same_error(
    stub: Stub, anonymous_stub: Stub, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    stub.SetUserActive(pb.SetUserActiveRequest(username=person.username, active=False))
    attempts = {
        "unknown user": ("nobody-" + secrets.token_hex(4), "whatever-password"),
        "wrong password": ("admin", "not-the-admin-password"),
        "deactivated user": (person.username, person.password),
        "empty": ("", ""),
    }
    for what, (username, password) in attempts.items():
        error = rpc_error(lambda u=username, p=password: login(anonymous_stub, u, p))  # type: ignore[misc]
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, BAD_LOGIN), what


def test_password_and_username_rules(stub: Stub) -> None:
    def create(username: str, password: str) -> grpc.RpcError:
        return rpc_error(lambda: stub.CreateUser(pb.CreateUserRequest(username=username, password=password)))

    short = create(f"u-{secrets.token_hex(4)}", "elevenchars")
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 12 characters" in short.details()
    for bad in ["Upper", "-dash", "a", "sp ace", "x" * 64]:
        error = create(bad, "long-enough-password")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid username" in error.details()
    taken = create("admin", "long-enough-password")
    assert (taken.code(), taken.details()) == (grpc.StatusCode.ALREADY_EXISTS, "user 'admin' already exists")


def test_api_tokens_are_listed_and_revocation_acts_at_once(
    anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    created = person.stub.CreateToken(pb.CreateTokenRequest(name="ci", expires_in_s=600))
    assert created.token.startswith("joey_") and created.info.kind == "api"
    assert created.info.HasField("expires_at")
    ci = token_stub(channel, created.token)
    assert ci.WhoAmI(pb.WhoAmIRequest()).username == person.username
    names = {(t.name, t.kind) for t in person.stub.ListTokens(pb.ListTokensRequest()).tokens}
    assert {("ci", "api"), ("tests", "api")} <= names

    taken = rpc_error(lambda: person.stub.CreateToken(pb.CreateTokenRequest(name="ci", expires_in_s=60)))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS

    person.stub.RevokeToken(pb.RevokeTokenRequest(name="ci"))
    refused = rpc_error(lambda: ci.WhoAmI(pb.WhoAmIRequest()))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "ci" not in {t.name for t in person.stub.ListTokens(pb.ListTokensRequest()).tokens}
    again = rpc_error(lambda: person.stub.RevokeToken(pb.RevokeTokenRequest(name="ci")))
    assert (again.code(), again.details()) == (grpc.StatusCode.NOT_FOUND, "no live token named 'ci'")
    # The name is free again; the new secret is a different one.
    assert person.stub.CreateToken(pb.CreateTokenRequest(name="ci", expires_in_s=60)).token != created.token


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Basic abc"),), (("authorization", "Bearer joey_nope"),)]
)
def test_calls_without_a_valid_token_are_unauthenticated(anonymous_stub: Stub, metadata: tuple) -> None:
    error = rpc_error(lambda: anonymous_stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_deactivation_acts_at_once(
    stub: Stub, anonymous_stub: Stub, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).active
    off = stub.SetUserActive(pb.SetUserActiveRequest(username=person.username, active=False))
    assert not off.active
    assert rpc_error(lambda: person.stub.WhoAmI(pb.WhoAmIRequest())).code() == grpc.StatusCode.UNAUTHENTICATED
    listed = {u.username: u.active for u in stub.ListUsers(pb.ListUsersRequest()).users}
    assert listed[person.username] is False
    stub.SetUserActive(pb.SetUserActiveRequest(username=person.username, active=True))
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username
    assert login(anonymous_stub, person.username, person.password).token


def test_logout_revokes_the_token_it_carries(
    anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    session = token_stub(channel, login(anonymous_stub, person.username, person.password).token)
    session.Logout(pb.LogoutRequest())
    assert rpc_error(lambda: session.WhoAmI(pb.WhoAmIRequest())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username


def test_a_session_expires(
    anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    reply = login(anonymous_stub, person.username, person.password, expires_in_s=1)
    session = token_stub(channel, reply.token)

    def refused() -> bool:
        try:
            session.WhoAmI(pb.WhoAmIRequest())
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return True
        return False

    wait_until(refused, 30, "the session to expire")
    assert datetime.now(UTC) >= reply.expires_at.ToDatetime(tzinfo=UTC)
    for bad in (0, 43201):
        error = rpc_error(
            lambda b=bad: login(anonymous_stub, person.username, person.password, expires_in_s=b)
        )  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expires_in_s" in error.details()


def test_change_password_revokes_the_other_sessions(
    anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    current = token_stub(channel, login(anonymous_stub, person.username, person.password).token)
    other = token_stub(channel, login(anonymous_stub, person.username, person.password).token)
    new = "a-brand-new-password"

    wrong = rpc_error(
        lambda: current.ChangePassword(
            pb.ChangePasswordRequest(old_password="wrong-password!", new_password=new)
        )
    )
    assert (wrong.code(), wrong.details()) == (grpc.StatusCode.PERMISSION_DENIED, "current password is wrong")
    short = rpc_error(
        lambda: current.ChangePassword(
            pb.ChangePasswordRequest(old_password=person.password, new_password="short")
        )
    )
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT

    current.ChangePassword(pb.ChangePasswordRequest(old_password=person.password, new_password=new))
    assert current.WhoAmI(pb.WhoAmIRequest()).username == person.username
    assert rpc_error(lambda: other.WhoAmI(pb.WhoAmIRequest())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username  # API tokens stay
    assert rpc_error(lambda: login(anonymous_stub, person.username, person.password)).details() == BAD_LOGIN
    assert login(anonymous_stub, person.username, new).user.username == person.username


def test_only_admins_manage_users(new_person: Callable[..., Person]) -> None:
    person = new_person()
    for call in (
        lambda: person.stub.CreateUser(
            pb.CreateUserRequest(username="someone", password="long-enough-password")
        ),
        lambda: person.stub.ListUsers(pb.ListUsersRequest()),
        lambda: person.stub.SetUserActive(pb.SetUserActiveRequest(username="admin", active=False)),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.PERMISSION_DENIED
    admin = new_person(admin=True)
    assert admin.stub.WhoAmI(pb.WhoAmIRequest()).admin
    assert person.username in {u.username for u in admin.stub.ListUsers(pb.ListUsersRequest()).users}


def test_no_password_or_token_is_stored_in_plain_text(
    database_url: str, admin_token: str, anonymous_stub: Stub, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    session = login(anonymous_stub, person.username, person.password).token
    api = person.stub.CreateToken(pb.CreateTokenRequest(name="scan", expires_in_s=60)).token
    secrets_used = [ADMIN_PASSWORD, SERVICE_TOKEN, admin_token, person.password, person.token, session, api]
    with psycopg.connect(database_url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'character')"
        ).fetchall()
        assert ("users", "password_hash") in columns and ("tokens", "token_sha256") in columns
        for table, column in columns:
            for secret in secrets_used:
                found = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE strpos({}::text, %s) > 0").format(
                        sql.Identifier(table), sql.Identifier(column)
                    ),
                    (secret,),
                ).fetchone()
                assert found == (0,), f"a secret is stored in plain text in {table}.{column}"


# --- the bootstrap, on databases of their own ---


@contextmanager
def identity_core(url: str, admin_password: str | None) -> Iterator[Identity]:
    settings = RegistrySettings(database_url=url, admin_password=admin_password)
    store = Store(url, max_size=2)
    store.open()
    try:
        yield Identity(settings, IdentityStore(store.pool), Access(store), redis.Redis.from_url(REDIS_URL))
    finally:
        store.close()


@pytest.mark.parametrize(
    ("password", "problem"), [("", "is not set"), ("short-pw", "is shorter than 12 characters")]
)
def test_the_registry_refuses_to_start_without_an_admin_password(
    env: dict[str, str], service_factory: Callable[..., ServiceProcess], password: str, problem: str
) -> None:
    with scratch_database("joey_bootstrap") as url:
        registry = service_factory("registry", JOEY_DATABASE_URL=url, JOEY_ADMIN_PASSWORD=password)
        wait_until(lambda: not registry.alive(), 60, "the registry to refuse to start")
        assert registry.stop() != 0
        log = registry.log_text()
        assert f"no user exists yet and JOEY_ADMIN_PASSWORD {problem}" in log
        assert "Traceback" not in log
        with identity_core(url, password) as identity, pytest.raises(BootstrapRefused):
            identity.bootstrap()


def test_bootstrap_creates_the_admin_once() -> None:
    with scratch_database("joey_bootstrap") as url:
        with identity_core(url, "first-admin-password") as identity:
            identity.bootstrap()
            assert identity.login("admin", "first-admin-password", None)[2].admin
        # Users exist: a later start ignores the password, and needs none.
        with identity_core(url, None) as identity:
            identity.bootstrap()
            token, _, admin = identity.login("admin", "first-admin-password", None)
            caller = identity.resolve([("authorization", f"Bearer {token}")])
            assert (caller.user, caller.token_kind, caller.is_service) == (admin, "session", False)
            with pytest.raises(FailedPrecondition, match="last active platform admin"):
                identity.set_user_active(caller, "admin", False)


# Copied from the session database into one at migration 0010, in dependency order.
_SEEDED = {
    "models": "id, workspace_id, name, created_at, last_version",
    "model_versions": "id, model_id, version, sha256, size_bytes, framework, inputs, outputs, created_at",
    "pipelines": "id, workspace_id, name, created_at",
    "pipeline_versions": "id, pipeline_id, version, steps, created_at",
    "assays": "id, workspace_id, name, pipeline, definition, active, created_at",
}


def _seed_from(database_url: str, workspace: str, url: str) -> None:
    """Copy what ``workspace`` holds in the session database into ``url``'s workspace 'team-a'."""
    with psycopg.connect(database_url) as source, psycopg.connect(url) as target:
        (ws_id,) = source.execute("SELECT id FROM workspaces WHERE name = %s", (workspace,)).fetchone()  # type: ignore[misc]
        target.execute("INSERT INTO workspaces (id, name) VALUES (%s, 'team-a')", (ws_id,))
        for table, columns in _SEEDED.items():
            rows = source.execute(
                sql.SQL("SELECT {} FROM {} t WHERE {}").format(
                    sql.SQL(columns),
                    sql.Identifier(table),
                    sql.SQL(
                        "t.workspace_id = %(ws)s"
                        if "workspace_id" in columns
                        else "t.model_id IN (SELECT id FROM models WHERE workspace_id = %(ws)s)"
                        if table == "model_versions"
                        else "t.pipeline_id IN (SELECT id FROM pipelines WHERE workspace_id = %(ws)s)"
                    ),
                ),
                {"ws": ws_id},
            ).fetchall()
            assert rows, table
            marks = ", ".join(["%s"] * len(rows[0]))
            with target.cursor() as cur:
                cur.executemany(
                    sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        sql.Identifier(table), sql.SQL(columns), sql.SQL(marks)
                    ),
                    [tuple(Jsonb(v) if isinstance(v, dict | list) else v for v in row) for row in rows],
                )
        target.execute(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, inputs, outputs) "
            "VALUES ('team-a', 'p', 1, 'd1', 'r1', now(), 'in', 0, 0, true, %s, %s)",
            (Jsonb({"x": 1.0}), Jsonb({"y": 1.0})),
        )


def test_an_upgraded_database_keeps_what_it_held_owned_by_admin(
    stub: Stub, workspace: str, database_url: str, registry_settings: RegistrySettings
) -> None:
    upload(stub, workspace, "m", identity_model("x", "float32", "y"))
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("m")]))
    assay = pb.AssayDefinition(
        workspace=workspace, name="drift", pipeline="p", iopath="input x", baseline_data=[1.0, 2.0]
    )
    stub.CreateAssay(pb.CreateAssayRequest(definition=assay))
    password = f"upgrade-{secrets.token_urlsafe(12)}"
    with scratch_database("joey_upgrade", up_to=10) as url:
        _seed_from(database_url, workspace, url)
        assert migrations.migrate(url, up_to=11) == ["0011_identity.sql"]
        migrations.migrate(url)  # the later ones too, as `joey serve registry` does at start
        with registry_on(registry_settings, url, password) as channel:
            token = login(registry_pb2_grpc.RegistryStub(channel), "admin", password).token
            admin = token_stub(channel, token)
            workspaces = {w.name: w.role for w in admin.ListWorkspaces(pb.ListWorkspacesRequest()).workspaces}
            assert workspaces == {"default": "owner", "team-a": "owner"}
            models = admin.ListModels(pb.ListModelsRequest(workspace="team-a")).models
            assert [m.name for m in models] == ["m"]
            pipelines = admin.ListPipelines(pb.ListPipelinesRequest(workspace="team-a")).pipelines
            assert [p.name for p in pipelines] == ["p"]
            logs = admin.QueryLogs(pb.QueryLogsRequest(workspace="team-a", pipeline="p")).entries
            assert [e.request_id for e in logs] == ["r1"]
            assays = admin.ListAssays(pb.ListAssaysRequest(workspace="team-a")).assays
            assert [a.definition.name for a in assays] == ["drift"]


def test_an_api_token_makes_none_outliving_it_and_a_session_makes_any(
    anonymous_stub: Stub,
    channel: grpc.Channel,
    registry_server: RegistryServer,
    new_person: Callable[..., Person],
) -> None:
    person = new_person()
    session = token_stub(
        channel, login(anonymous_stub, person.username, person.password, expires_in_s=600).token
    )
    # A session proves the password: it makes CI tokens that never expire.
    ci = session.CreateToken(pb.CreateTokenRequest(name="ci"))
    assert not ci.info.HasField("expires_at")
    short = token_stub(
        channel, session.CreateToken(pb.CreateTokenRequest(name="short", expires_in_s=600)).token
    )
    for expires_in_s in (None, 3600):
        refused = rpc_error(
            lambda e=expires_in_s: short.CreateToken(pb.CreateTokenRequest(name="long", expires_in_s=e))  # type: ignore[misc]
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expires_in_s must be at most" in refused.details()
    assert short.CreateToken(pb.CreateTokenRequest(name="shorter", expires_in_s=60)).info.HasField(
        "expires_at"
    )
    # A token that never expires (made before this rule, or by an operator) may make any.
    forever = f"joey_{secrets.token_urlsafe(32)}"
    store = registry_server.registry.identity.store
    assert store.add_token(person.username, token_sha256(forever), "forever", "api", None)
    made = token_stub(channel, forever).CreateToken(pb.CreateTokenRequest(name="ci-forever"))
    assert not made.info.HasField("expires_at")


def test_deactivation_ends_sessions_and_keeps_api_tokens(
    stub: Stub, anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    session = token_stub(channel, login(anonymous_stub, person.username, person.password).token)
    stub.SetUserActive(pb.SetUserActiveRequest(username=person.username, active=False))
    stub.SetUserActive(pb.SetUserActiveRequest(username=person.username, active=True))
    assert rpc_error(lambda: session.WhoAmI(pb.WhoAmIRequest())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username


def test_logout_with_an_api_token_is_refused(new_person: Callable[..., Person]) -> None:
    person = new_person()
    refused = rpc_error(lambda: person.stub.Logout(pb.LogoutRequest()))
    assert (refused.code(), refused.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "logout ends a session; revoke API tokens with `joey token revoke <name>`",
    )
    assert person.stub.WhoAmI(pb.WhoAmIRequest()).username == person.username


def test_a_short_service_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="JOEY_SERVICE_TOKEN is shorter than 32 characters"):
        RegistrySettings(service_token="joey_short")
    assert RegistrySettings(service_token="x" * 32).service_token


def test_a_registry_on_a_fresh_database_lets_admin_log_in(registry_settings: RegistrySettings) -> None:
    password = f"fresh-{secrets.token_urlsafe(12)}"
    with scratch_database("joey_fresh") as url, registry_on(registry_settings, url, password) as channel:
        reply = login(registry_pb2_grpc.RegistryStub(channel), "admin", password)
        assert reply.user.admin
        admin = token_stub(channel, reply.token)
        assert admin.WhoAmI(pb.WhoAmIRequest()).username == "admin"
        listed = {w.name for w in admin.ListWorkspaces(pb.ListWorkspacesRequest()).workspaces}
        assert listed == {"default"}
