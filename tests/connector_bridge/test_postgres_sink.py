"""The Postgres sink against a scratch database: a table someone else holds locked makes its write fail
after the statement timeout, to be retried, rather than block the sink's poll loop."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from joey_connector_bridge.connectors import Bridge, ResultRow, Unavailable
from joey_connector_bridge.postgres import PostgresSink
from joey_connector_bridge.settings import BridgeSettings
from joey_core.bridges import BridgeSpec
from tests.conftest import scratch_database


@pytest.fixture
def scratch_url() -> Iterator[str]:
    with scratch_database("joey_pg_sink") as url:
        yield url


def test_a_postgres_sink_write_blocked_by_a_lock_fails_after_its_statement_timeout(scratch_url: str) -> None:
    bridge = Bridge(
        BridgeSpec(7, "ws", "out", "sink", "p", "c", "outputs"),
        BridgeSettings(sink_statement_timeout_s=0.2, poll_interval_s=0.1),
    )
    sink = PostgresSink({"url": scratch_url, "table": "results"}, bridge)
    rows = [ResultRow(f"feed/{i}", str(i), None, {"y": i}, None, 1, "t", 0, i) for i in range(2)]
    try:
        sink.write(rows[:1])  # creates the table
        with psycopg.connect(scratch_url) as holder:
            holder.execute("LOCK TABLE results IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(Unavailable, match="statement timeout"):
                sink.write(rows)
        sink.write(rows)  # the lock released: the retry writes
        with psycopg.connect(scratch_url) as conn:
            assert conn.execute("SELECT count(*) FROM results").fetchone() == (2,)
    finally:
        sink.close()
