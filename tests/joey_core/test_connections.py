"""The connection types against real stores: a second Postgres database, the session's broker as an
external cluster, a directory, moto's S3 API server and a local HTTP server; validation, secrets,
sealing and the test policy without any."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography.fernet import Fernet

from joey_cli.broker import EmbeddedBroker
from joey_core.connections import (
    TYPES,
    InvalidDetails,
    Sealer,
    SecretKeyError,
    TestPolicy,
    TestRefused,
    connection_type,
    redacted,
    secret_values,
)
from joey_core.connections.base import secret_name
from tests.conftest import free_port
from tests.externals import HttpServer, S3Server, external_database, http_server, s3_server

TIMEOUT_S = 5.0


def valid(kind: str, **details: Any) -> dict[str, Any]:
    return connection_type(kind).validate(details)


def refused(kind: str, details: dict[str, Any]) -> InvalidDetails:
    with pytest.raises(InvalidDetails) as caught:
        connection_type(kind).validate(details)
    return caught.value


@pytest.fixture(scope="module")
def external_db() -> Iterator[str]:
    with external_database() as url:
        yield url


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def web() -> Iterator[HttpServer]:
    with http_server() as server:
        yield server


def test_the_five_types_are_registered() -> None:
    assert sorted(TYPES) == ["files", "http", "kafka", "postgres", "s3"]


@pytest.mark.parametrize(
    ("kind", "details", "field"),
    [
        ("postgres", {}, "url"),
        ("postgres", {"url": "mysql://h/db"}, "url"),
        ("postgres", {"url": "postgresql://h/db", "table": "a;drop"}, "table"),
        ("postgres", {"url": "postgresql://h/db", "key": "id"}, "key"),
        ("postgres", {"url": "postgresql://h/db", "table": "t", "query": "select 1"}, "query"),
        ("postgres", {"url": "postgresql://h/db?passfile=/etc/x"}, "url"),
        ("postgres", {"url": "postgresql://h/db?password=hidden"}, "url"),
        ("postgres", {"url": "postgresql://h/db", "pasword": "typo"}, "pasword"),
        ("kafka", {"bootstrap": "no-port"}, "bootstrap"),
        ("kafka", {"bootstrap": "h:9092", "security_protocol": "SASL_SSL"}, "sasl_mechanism"),
        ("kafka", {"bootstrap": "h:9092", "sasl_username": "u"}, "security_protocol"),
        ("kafka", {"bootstrap": "h:9092", "topic": "bad topic"}, "topic"),
        ("files", {"path": "relative/dir"}, "path"),
        ("files", {"path": "/data", "pattern": "../*"}, "pattern"),
        ("files", {"path": "/data", "format": "xls"}, "format"),
        ("s3", {"bucket": "Bad_Bucket"}, "bucket"),
        ("s3", {"bucket": "ok-bucket", "endpoint": "ftp://h"}, "endpoint"),
        ("s3", {"bucket": "ok-bucket", "access_key_id": "a"}, "secret_access_key"),
        ("http", {"url": "file:///etc/passwd"}, "url"),
        ("http", {"url": "http://h/", "headers": {"X": "a\r\nInjected: 1"}}, "headers.X"),
        ("http", {"url": "http://h/", "test_method": "POST"}, "test_method"),
    ],
)
def test_bad_details_are_refused_naming_the_field(kind: str, details: dict[str, Any], field: str) -> None:
    assert refused(kind, details).field == field


def test_a_url_libpq_cannot_parse_is_refused_without_echoing_it() -> None:
    found = refused("postgres", {"url": "postgresql://u:Pa55%word-TOPSECRET@db/x"})
    assert found.field == "url" and "TOPSECRET" not in str(found), found


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(InvalidDetails, match="unknown connection type 'ftp'"):
        connection_type("ftp")


def test_secret_values_are_found_and_redacted() -> None:
    pg = valid("postgres", url="postgresql://reader:pg%40pw@db.example.com/sales", table="orders")
    assert redacted(TYPES["postgres"], pg)["url"] == "postgresql://reader:***@db.example.com/sales"
    assert set(secret_values(TYPES["postgres"], pg)) >= {"pg%40pw", "pg@pw"}
    web = valid(
        "http", url="https://h/hook?api_key=k1&x=2", headers={"Authorization": "Bearer t1", "Accept": "a"}
    )
    shown = redacted(TYPES["http"], web)
    assert shown["url"] == "https://h/hook?api_key=***&x=2"
    assert shown["headers"] == {"Authorization": "***", "Accept": "a"}
    s3 = valid("s3", bucket="b-1", access_key_id="AKIA1", secret_access_key="sk1", session_token="st1")
    assert redacted(TYPES["s3"], s3) | {} == s3 | {"secret_access_key": "***", "session_token": "***"}
    kafka = valid("kafka", bootstrap="h:9092", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                  sasl_username="u", sasl_password="kpw")  # fmt: skip
    assert redacted(TYPES["kafka"], kafka)["sasl_password"] == "***"
    files = valid("files", path="/data")
    assert redacted(TYPES["files"], files) == files


def test_sealing_keeps_secrets_out_of_the_stored_form_and_rotates() -> None:
    kind = TYPES["http"]
    details = valid("http", url="http://u:urlpw@h/", headers={"X-Api-Key": "hdrsecret"})
    old = Fernet.generate_key().decode()
    public, token = Sealer([old]).seal(kind, details)
    assert token is not None
    stored = repr(public) + token.decode()
    assert "urlpw" not in stored and "hdrsecret" not in stored
    assert Sealer([old]).unseal(public, token) == details
    new = Fernet.generate_key().decode()
    rotating = Sealer([new, old])
    assert rotating.unseal(public, token) == details  # the old key still opens
    resealed = rotating.rotate(token)
    assert Sealer([new]).unseal(public, resealed) == details  # and the new one alone, once re-sealed
    with pytest.raises(SecretKeyError, match="no longer holds"):
        Sealer([new]).unseal(public, token)
    with pytest.raises(SecretKeyError, match="Fernet keys"):
        Sealer(["not-a-key"])


def test_the_policy_allows_only_what_it_lists(tmp_path: Path) -> None:
    policy = TestPolicy.of(["db.example.com", "*.corp.example", "10.0.0.0/8", "::1"], [str(tmp_path)])
    assert policy.host_allowed("DB.example.com")
    assert policy.host_allowed("kafka-1.corp.example")
    assert policy.host_allowed("10.1.2.3") and policy.host_allowed("::1")
    assert not policy.host_allowed("corp.example")
    assert not policy.host_allowed("169.254.169.254")
    assert not policy.host_allowed("10.internal")  # a name never matches a network
    assert policy.directory_allowed(str(tmp_path / "in"))
    assert not policy.directory_allowed(str(tmp_path / ".." / "elsewhere"))
    with pytest.raises(TestRefused, match="JOEY_CONNECTION_TEST_HOSTS .now: none.; '127.0.0.1'"):
        TestPolicy().check(TYPES["postgres"].probe(valid("postgres", url="postgresql://127.0.0.1/x")))
    # libpq's local socket when no host is given: refused unless "localhost" is allowed.
    assert TYPES["postgres"].probe(valid("postgres", url="postgresql:///x")).hosts == ("localhost",)
    assert TestPolicy.of(["*"], []).host_allowed("anything.example")


def test_postgres_reports_a_tables_rows_and_columns(external_db: str) -> None:
    pg = TYPES["postgres"]
    report = pg.test(valid("postgres", url=external_db, table="wine_in", key="id"), TIMEOUT_S)
    assert report.ok, report
    assert report.found == {
        "table": "wine_in",
        "exists": True,
        "rows": 3,
        "columns": ["id", "alcohol", "label"],
    }
    missing = pg.test(valid("postgres", url=external_db, table="nope"), TIMEOUT_S)
    assert not missing.ok and missing.found["exists"] is False
    no_key = pg.test(valid("postgres", url=external_db, table="wine_in", key="ident"), TIMEOUT_S)
    assert not no_key.ok and "no column 'ident'" in no_key.message
    query = pg.test(valid("postgres", url=external_db, query="SELECT id, label FROM wine_in"), TIMEOUT_S)
    assert query.ok and query.found == {"columns": ["id", "label"]}
    down = pg.test(valid("postgres", url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"), TIMEOUT_S)
    assert not down.ok and down.message.startswith("cannot use the database")


def test_a_postgres_test_runs_nothing_of_its_query(external_db: str) -> None:
    query = "SELECT id, nextval('wine_seq') AS n FROM wine_in"
    report = TYPES["postgres"].test(valid("postgres", url=external_db, query=query), TIMEOUT_S)
    assert report.ok and report.found == {"columns": ["id", "n"]}
    with psycopg.connect(external_db) as conn:
        row = conn.execute("SELECT is_called FROM wine_seq").fetchone()
    assert row == (False,)  # the query was planned for its columns, never run


def test_kafka_reports_a_topics_partitions(broker: EmbeddedBroker) -> None:
    topic = f"external-{secrets.token_hex(4)}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, 3)])[topic].result(30)
    kafka = TYPES["kafka"]
    report = kafka.test(valid("kafka", bootstrap=broker.bootstrap, topic=topic), TIMEOUT_S)
    assert report.ok, report
    assert report.found["partitions"] == 3 and report.found["exists"] is True
    missing = kafka.test(valid("kafka", bootstrap=broker.bootstrap, topic=f"{topic}-absent"), TIMEOUT_S)
    assert not missing.ok and missing.found["exists"] is False
    down = kafka.test(valid("kafka", bootstrap=f"127.0.0.1:{free_port()}"), 2.0)
    assert not down.ok and down.message.startswith("cannot reach the cluster")


def test_files_reports_the_matching_files(tmp_path: Path) -> None:
    for name in ("a.csv", "b.csv", "c.json"):
        (tmp_path / name).write_text("x")
    report = TYPES["files"].test(valid("files", path=str(tmp_path), pattern="*.csv"), TIMEOUT_S)
    assert report.ok and report.found == {"exists": True, "files": 2}
    missing = TYPES["files"].test(valid("files", path=str(tmp_path / "absent")), TIMEOUT_S)
    assert not missing.ok and missing.found == {"exists": False}


def test_s3_reports_the_objects_under_the_prefix(s3: S3Server) -> None:
    creds = {
        "endpoint": s3.endpoint,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
    }
    report = TYPES["s3"].test(valid("s3", bucket=s3.bucket, prefix="in/", **creds), TIMEOUT_S)
    assert report.ok, report
    assert report.found == {"bucket": s3.bucket, "exists": True, "objects": 2}
    everything = TYPES["s3"].test(valid("s3", bucket=s3.bucket, **creds), TIMEOUT_S)
    assert everything.found["objects"] == 3
    missing = TYPES["s3"].test(valid("s3", bucket="no-such-bucket", **creds), TIMEOUT_S)
    assert not missing.ok


def test_http_reports_the_status_with_the_headers_and_follows_no_redirect(web: HttpServer) -> None:
    hook = valid("http", url=f"{web.url}/hook", headers={"Authorization": "Bearer hooktoken"})
    report = TYPES["http"].test(hook, TIMEOUT_S)
    assert report.ok and report.found == {"status": 200}
    method, path, headers = web.requests[-1]
    assert (method, path, headers["Authorization"]) == ("HEAD", "/hook", "Bearer hooktoken")
    moved = TYPES["http"].test(valid("http", url=f"{web.url}/moved", test_method="GET"), TIMEOUT_S)
    assert not moved.ok and moved.found == {"status": 302} and "redirect to /elsewhere" in moved.message
    assert all(path != "/elsewhere" for _, path, _ in web.requests)
    assert not TYPES["http"].test(valid("http", url=f"{web.url}/absent"), TIMEOUT_S).ok


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "X-Auth",
        "sig",
        "X-Signature",
        "key",
        "access_key",
        "x-functions-key",
        "api_key",
        "Cookie",
    ],
)
def test_names_that_hold_secrets_are_secret(name: str) -> None:
    assert secret_name(name)


@pytest.mark.parametrize("name", ["Content-Type", "Accept", "page", "monkey", "keys_per_batch"])
def test_names_that_hold_no_secret_are_shown(name: str) -> None:
    assert not secret_name(name)
