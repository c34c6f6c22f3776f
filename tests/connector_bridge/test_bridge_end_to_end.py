"""A Postgres source feeding a deployed pipeline and a Postgres sink writing its results, with
connector-bridge processes of their own against the session's stack and two databases apart from
Joey's (the source's and the sink's): exactly one row per input across a kill -9 of the bridge
mid-stream, and across an outage of the sink's database."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import ServiceProcess, Stack, wait_until
from tests.connector_bridge.helpers import (
    FEATURES,
    assert_results,
    deployed_pipeline,
    start_bridge,
    table_rows,
)
from tests.externals import external_database

DB_PASSWORD = f"pgpw-{secrets.token_hex(6)}"
"""In the sink's URL (trust auth ignores it): it must never reach the bridge's log."""


@dataclass
class World:
    client: Client
    source_url: str
    sink_url: str
    pipeline: str
    model: Any


@pytest.fixture(scope="module")
def world(stack: Stack, settings: CommonSettings, iris_model: Path) -> Iterator[World]:
    with (
        external_database() as source_url,
        external_database() as sink_url,
        deployed_pipeline(settings, iris_model, "bridge-e2e") as deployed,
    ):
        with_password = sink_url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@", 1)
        yield World(deployed.client, source_url, with_password, deployed.pipeline, deployed.model)


def insert(url: str, table: str, first: int, count: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, features real[])")
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(i, FEATURES) for i in range(first, first + count)]
            )


def assert_exactly_once(found: list[tuple], source: str, keys: range) -> None:
    assert_results(found, {f"{source}/{k}" for k in keys})
    assert all(r[1] is not None for r in found), "every row keyed by its source row"


def test_a_source_and_a_sink_move_each_row_once_across_a_kill_9_of_the_bridge(
    world: World, service_factory: Callable[..., ServiceProcess], stack: Stack
) -> None:
    client = world.client

    def results() -> list[tuple]:
        return table_rows(world.sink_url, "iris_out")

    insert(world.source_url, "iris_in", 1, 300)
    client.create_connection(
        "iris-in", "postgres", {"url": world.source_url, "table": "iris_in", "key": "id"}
    )
    client.create_connection("iris-out", "postgres", {"url": world.sink_url, "table": "iris_out"})
    source = client.create_source("feed", connection="iris-in", pipeline=world.pipeline)
    sink = client.create_sink("results", pipeline=world.pipeline, connection="iris-out")

    bridge = start_bridge(service_factory, stack.env)
    wait_until(lambda: results(), 60, "the first results in the sink")
    killed = bridge
    bridge.kill9()
    moved_before_kill = len(results())
    insert(world.source_url, "iris_in", 301, 200)  # new rows while no bridge runs

    bridge = start_bridge(service_factory, stack.env)
    wait_until(lambda: len(results()) >= 500, 90, "every row in the sink")
    assert_exactly_once(results(), "feed", range(1, 501))
    # Counted exactly, a batch sent again after the kill (acknowledged, not checkpointed) once.
    wait_until(lambda: source.status().rows_moved == 500, 30, "the source's status counting its rows")
    assert sink.status().state == "running"
    print(f"killed with {moved_before_kill} of 300 rows in the sink")  # noqa: T201 (how mid-stream it was)

    # The sink's database goes away: the bridge waits, says why, and loses nothing once it is back.
    sink_db = psycopg.conninfo.conninfo_to_dict(world.sink_url)["dbname"]
    with psycopg.connect(world.source_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{sink_db}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (sink_db,))
        insert(world.source_url, "iris_in", 501, 100)
        # Its connection cut first, then each reconnection refused: status names the refusal.
        wait_until(
            lambda: "not currently accepting connections" in sink.status().last_error,
            30,
            "the sink retrying, and why",
        )
        assert sink.status().state == "retrying"
        admin.execute(f'ALTER DATABASE "{sink_db}" ALLOW_CONNECTIONS true')
    wait_until(lambda: len(results()) >= 600, 60, "the rows held back by the outage")
    assert_exactly_once(results(), "feed", range(1, 601))
    wait_until(lambda: sink.status().state == "running", 30, "the sink running again")

    # A row the pipeline cannot run is a result too: its row carries the error.
    with psycopg.connect(world.source_url, autocommit=True) as conn:
        conn.execute("INSERT INTO iris_in VALUES (601, '{1.0}')")
    found = wait_until(lambda: [r for r in results() if r[0] == "feed/601"], 60, "the failed row")
    assert found[0][2] is None and "features" in found[0][3], found  # type: ignore[index]

    # Paused, the sink's runner leaves; resumed, it takes up the results that came meanwhile.
    sink.pause()
    wait_until(
        lambda: f"stopped sink {client.workspace}/results" in bridge.log_text(), 30, "the sink stopped"
    )
    insert(world.source_url, "iris_in", 602, 10)
    assert sink.status().state == "paused"
    sink.resume()
    wait_until(lambda: len(results()) >= 611, 60, "the rows sent while paused")
    assert sorted(r[0] for r in results()) == sorted(f"feed/{k}" for k in range(1, 612))
    bridge.stop()
    assert "retries" in bridge.log_text()
    assert DB_PASSWORD not in bridge.log_text() + killed.log_text()


def test_a_sink_of_a_pipeline_never_deployed_waits_and_says_so(
    world: World, service_factory: Callable[..., ServiceProcess], stack: Stack
) -> None:
    client = world.client
    client.build_pipeline("idle").add_model_step(world.model).create()
    client.create_connection("idle-out", "postgres", {"url": world.sink_url, "table": "idle_out"})
    sink = client.create_sink("idle-results", pipeline="idle", connection="idle-out")
    bridge = start_bridge(service_factory, stack.env)
    wait_until(lambda: "deploy it" in sink.status().last_error, 30, "the sink waiting for the deployment")
    assert sink.status().state == "retrying"
    sink.delete()
    bridge.stop()
