"""Connections through the SDK against a `joey serve registry` process of their own (allowed to test
this machine's hosts and one directory): secrets sealed in the database and never in its log, shown
redacted in listings and in full to members only, shared between workspaces, tested in its child
process."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from joey.client import Client, JoeyError, Workspace
from joey_core.settings import CommonSettings
from tests.conftest import ServiceProcess, free_port, wait_registry_ready
from tests.externals import HttpServer, external_database, http_server

DB_PASSWORD = f"pgpw-{secrets.token_hex(6)}"
HOOK_TOKEN = f"hooktok-{secrets.token_hex(6)}"


@dataclass
class Registry:
    process: ServiceProcess
    settings: CommonSettings
    directory: Path

    def login(self, admin: Client) -> tuple[str, Client]:
        name, password = f"u-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        admin.create_user(name, password)
        return name, Client.login(name, password, settings=self.settings)

    def assert_never_logged(self, *values: str) -> None:
        text = self.process.log_text()
        assert text
        for value in values:
            assert value not in text


@pytest.fixture(scope="module")
def registry(
    settings: CommonSettings,
    service_factory: Callable[..., ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Registry:
    addr = f"127.0.0.1:{free_port()}"
    directory = tmp_path_factory.mktemp("connection-files")
    process = service_factory(
        "registry",
        JOEY_REGISTRY_ADDR=addr,
        JOEY_LOG_LEVEL="DEBUG",
        JOEY_CONNECTION_TEST_HOSTS="127.0.0.1,localhost",
        JOEY_CONNECTION_TEST_DIRS=str(directory),
    )
    wait_registry_ready(addr)
    return Registry(process, settings.model_copy(update={"registry_addr": addr}), directory)


@pytest.fixture(scope="module")
def admin(registry: Registry) -> Iterator[Client]:
    with Client(settings=registry.settings) as client:  # the session's JOEY_TOKEN: the platform admin
        yield client


@pytest.fixture(scope="module")
def external_db() -> Iterator[str]:
    with external_database() as url:
        yield url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@", 1)


@pytest.fixture(scope="module")
def web() -> Iterator[HttpServer]:
    with http_server() as server:
        yield server


def refused(call: Callable[[], object], code: str) -> JoeyError:
    with pytest.raises(JoeyError) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


def test_a_postgres_connection_is_sealed_listed_redacted_read_and_tested(
    registry: Registry, admin: Client, external_db: str, database_url: str
) -> None:
    ws = admin.create_workspace(f"conn-{secrets.token_hex(3)}")
    admin.set_current_workspace(ws)
    conn = admin.create_connection(
        "wine-db", "postgres", {"url": external_db, "table": "wine_in", "key": "id"}
    )
    assert (conn.name, conn.type, conn.owner) == ("wine-db", "postgres", ws.name)
    assert DB_PASSWORD not in repr(conn)

    listing = admin.list_connections()
    [listed] = listing
    assert listed.listed["url"] == external_db.replace(DB_PASSWORD, "***")
    assert DB_PASSWORD not in listing.table() and "***" in listing.table()
    assert admin.get_connection("wine-db").details() == {"url": external_db, "table": "wine_in", "key": "id"}

    with psycopg.connect(database_url) as db:
        stored = db.execute(
            "SELECT c.details::text, c.secrets FROM connections c JOIN workspaces w ON w.id = c.workspace_id "
            "WHERE w.name = %s AND c.name = 'wine-db'",
            (ws.name,),
        ).fetchone()
    assert stored is not None
    assert DB_PASSWORD not in stored[0] and DB_PASSWORD.encode() not in bytes(stored[1])

    result = conn.test()
    assert result.ok, result
    assert result.found == {
        "table": "wine_in",
        "exists": True,
        "rows": 3,
        "columns": ["id", "alcohol", "label"],
    }
    assert [e.action for e in admin.audit_log(workspace=ws.name, action="GetConnection")] == ["GetConnection"]

    refused(lambda: admin.create_connection("wine-db", "files", {"path": "/tmp"}), "ALREADY_EXISTS")
    refused(lambda: admin.delete_workspace(ws.name), "FAILED_PRECONDITION")
    conn.delete()
    assert admin.list_connections() == []
    admin.delete_workspace(ws.name)
    admin.set_current_workspace("default")
    registry.assert_never_logged(DB_PASSWORD)


def test_bad_details_are_refused_naming_the_field_and_nothing_is_stored(admin: Client) -> None:
    ws = admin.create_workspace(f"conn-{secrets.token_hex(3)}")
    client = Client(settings=admin.settings, workspace=ws.name)
    bad = refused(
        lambda: client.create_connection(
            "feed", "kafka", {"bootstrap": "h:9092", "security_protocol": "SASL_SSL"}
        ),
        "INVALID_ARGUMENT",
    )
    assert "sasl_mechanism" in bad.message
    unknown = refused(
        lambda: client.create_connection("feed", "s3", {"bucket": "b-1", "secret": "x"}), "INVALID_ARGUMENT"
    )
    assert "secret: unknown field" in unknown.message
    refused(lambda: client.create_connection("feed", "ftp", {}), "INVALID_ARGUMENT")
    refused(lambda: client.create_connection("Bad Name", "files", {"path": "/tmp"}), "INVALID_ARGUMENT")
    assert client.list_connections() == []


def test_a_connection_is_shared_with_another_workspace_and_hidden_from_non_members(
    registry: Registry, admin: Client, web: HttpServer
) -> None:
    alice_name, alice = registry.login(admin)
    bob_name, bob = registry.login(admin)
    _, carol = registry.login(admin)
    team_a = alice.create_workspace(f"team-a-{secrets.token_hex(3)}")
    team_b = bob.create_workspace(f"team-b-{secrets.token_hex(3)}")
    team_b.add_user(alice_name)
    alice.set_current_workspace(team_a)
    hook = alice.create_connection(
        "hook", "http", {"url": f"{web.url}/hook", "headers": {"Authorization": HOOK_TOKEN}}
    )

    bob.set_current_workspace(team_a)
    refused(bob.list_connections, "NOT_FOUND")  # not a member of team-a: it does not exist for him
    refused(lambda: Workspace(bob, team_b.name).add_connection("hook", team_a.name), "NOT_FOUND")

    Workspace(alice, team_b.name).add_connection(hook)
    [shared] = team_b.list_connections()
    assert (shared.name, shared.owner, shared.listed["headers"]) == (
        "hook",
        team_a.name,
        {"Authorization": "***"},
    )
    assert alice.get_connection("hook").shared_with == (team_b.name,)
    bob.set_current_workspace(team_b)
    assert bob.get_connection("hook").details()["headers"] == {"Authorization": HOOK_TOKEN}
    result = bob.get_connection("hook").test()
    assert result.ok and result.found == {"status": 200}
    assert web.requests[-1][2]["Authorization"] == HOOK_TOKEN
    refused(lambda: bob.get_connection("hook").delete(), "FAILED_PRECONDITION")  # team-a's to delete
    refused(lambda: bob.create_connection("hook", "files", {"path": "/tmp"}), "ALREADY_EXISTS")

    carol.set_current_workspace(team_b)
    refused(carol.list_connections, "NOT_FOUND")
    refused(lambda: carol.get_connection("hook"), "NOT_FOUND")

    team_b.remove_connection("hook")  # bob owns team-b
    assert team_b.list_connections() == []
    refused(lambda: bob.get_connection("hook"), "NOT_FOUND")
    assert [c.name for c in alice.list_connections()] == ["hook"]
    registry.assert_never_logged(HOOK_TOKEN)


def test_tests_reach_only_what_the_registry_allows(registry: Registry, admin: Client) -> None:
    ws = admin.create_workspace(f"conn-{secrets.token_hex(3)}")
    client = Client(settings=admin.settings, workspace=ws.name)
    (registry.directory / "a.csv").write_text("x")
    files = client.create_connection("drop", "files", {"path": str(registry.directory), "pattern": "*.csv"})
    assert files.test().found == {"exists": True, "files": 1}
    metadata = client.create_connection(
        "metadata", "http", {"url": "http://169.254.169.254/latest/meta-data/"}
    )
    assert "JOEY_CONNECTION_TEST_HOSTS" in refused(metadata.test, "FAILED_PRECONDITION").message
    etc = client.create_connection("etc", "files", {"path": "/etc"})
    assert "JOEY_CONNECTION_TEST_DIRS" in refused(etc.test, "FAILED_PRECONDITION").message
