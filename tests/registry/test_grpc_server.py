"""How the registry's transport answers when what it stands on fails."""

from __future__ import annotations

import secrets

import grpc
import psycopg
from psycopg import sql

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry.settings import RegistrySettings
from tests.conftest import POSTGRES_ADMIN_URL, scratch_database, wait_until
from tests.registry.helpers import registry_on, rpc_error, token_stub


def _allow_connections(url: str, allowed: bool) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )


def test_a_database_outage_is_unavailable_not_internal(registry_settings: RegistrySettings) -> None:
    password = f"outage-{secrets.token_urlsafe(12)}"
    with scratch_database("joey_outage") as url, registry_on(registry_settings, url, password) as channel:
        reply = registry_pb2_grpc.RegistryStub(channel).Login(
            pb.LoginRequest(username="admin", password=password)
        )
        admin = token_stub(channel, reply.token)
        assert admin.WhoAmI(pb.WhoAmIRequest()).username == "admin"
        _allow_connections(url, False)
        try:
            error = rpc_error(lambda: admin.WhoAmI(pb.WhoAmIRequest()))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert "database is unavailable" in (error.details() or "")
            # Where the database runs is the registry's business: the caller only gets a reference.
            assert "5432" not in (error.details() or "")
        finally:
            _allow_connections(url, True)

        def answers() -> bool:
            try:
                return admin.WhoAmI(pb.WhoAmIRequest()).username == "admin"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                return False

        wait_until(answers, 30, "the registry to answer again once its database is back")
