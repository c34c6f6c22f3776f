"""External stores for the connection tests, all on this machine: a second Postgres database, an S3 API
server (moto's standalone server), and an HTTP server that records what it was sent."""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from tests.conftest import POSTGRES_ADMIN_URL, free_port


@contextmanager
def external_database() -> Iterator[str]:
    """A database apart from Joey's, with table ``wine_in`` (id, alcohol, label) of 3 rows and sequence
    ``wine_seq``."""
    name = f"joey_external_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE wine_in (id bigint PRIMARY KEY, alcohol double precision, label text)")
            conn.execute("INSERT INTO wine_in VALUES (1, 13.2, 'a'), (2, 12.1, 'b'), (3, 14.0, 'c')")
            conn.execute("CREATE SEQUENCE wine_seq")
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key_id: str = "testing"
    secret_access_key: str = field(default_factory=lambda: f"s3secret-{secrets.token_hex(6)}")

    def client(self) -> Any:
        """A boto3 S3 client of the server's, to put and check objects as a test."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API server on a free port, with a bucket holding two objects under ``in/`` and one
    elsewhere."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        found = S3Server(f"http://127.0.0.1:{port}", f"joey-{secrets.token_hex(4)}")
        s3 = found.client()
        s3.create_bucket(Bucket=found.bucket)
        for key in ("in/a.parquet", "in/b.parquet", "other/c.parquet"):
            s3.put_object(Bucket=found.bucket, Key=key, Body=b"x")
        yield found
    finally:
        server.stop()


@dataclass
class HttpServer:
    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    """(method, path, headers) of every request received."""


@contextmanager
def http_server() -> Iterator[HttpServer]:
    """Answers 200 on /hook, a redirect to /elsewhere on /moved, 404 otherwise."""
    found = HttpServer("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            found.requests.append((self.command, self.path, dict(self.headers)))
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/elsewhere")
            else:
                self.send_response(200 if self.path == "/hook" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _answer  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
