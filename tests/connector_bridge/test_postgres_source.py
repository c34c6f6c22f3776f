"""The Postgres source against concurrent writers on a real database: a row is handed over only once
every transaction that could still commit a lower key has ended, so no row is ever skipped."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from joey_connector_bridge.connectors import Bridge
from joey_connector_bridge.postgres import PostgresSource
from joey_connector_bridge.settings import BridgeSettings
from joey_core.bridges import BridgeSpec
from tests.externals import external_database

BRIDGE = Bridge(BridgeSpec(7, "ws", "feed", "source", "p", "c", "inputs"), BridgeSettings())


@pytest.fixture
def url() -> Iterator[str]:
    with external_database() as found:
        with psycopg.connect(found, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, amount float)")
            conn.execute("INSERT INTO orders (amount) VALUES (10)")  # id 1, settled
        yield found


def keys(source: PostgresSource, after: object) -> list[str]:
    return [r.key for r in source.read(after, 100)]


def test_a_key_committed_after_a_higher_one_is_not_skipped(url: str) -> None:
    source = PostgresSource({"url": url, "table": "orders", "key": "id"}, BRIDGE)
    with psycopg.connect(url) as slow, psycopg.connect(url, autocommit=True) as fast:
        slow.execute("INSERT INTO orders (amount) VALUES (20)")  # id 2, its transaction still open
        fast.execute("INSERT INTO orders (amount) VALUES (30)")  # id 3, committed first
        # Row 3 waits for row 2's writer: checkpointing 3 now would skip 2 for ever.
        assert keys(source, None) == ["1"]
        assert keys(source, 1) == []
        slow.commit()
        assert keys(source, 1) == ["2", "3"]
        assert source.lag(1) == 2
    source.close()


def test_an_open_transaction_anywhere_holds_newer_rows_back_until_it_ends(url: str) -> None:
    source = PostgresSource({"url": url, "table": "orders", "key": "id"}, BRIDGE)
    with psycopg.connect(url) as idle, psycopg.connect(url, autocommit=True) as writer:
        idle.execute("SELECT txid_current()")  # a transaction holding an id, writing nothing
        writer.execute("INSERT INTO orders (amount) VALUES (20)")
        assert keys(source, 1) == []
        idle.rollback()
        assert keys(source, 1) == ["2"]
    source.close()
