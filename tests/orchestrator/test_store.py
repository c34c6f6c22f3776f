"""The orchestrators' shared state on a database of its own: what a schedule fires after downtime, and
that two orchestrators claiming at once never run one task twice at a time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from joey_core import orchestrations as core
from joey_orchestrator.store import Backoff, OrchestratorStore
from tests.conftest import scratch_database

BACKOFF = Backoff(0, 0, 0, 0)


@pytest.fixture
def url() -> Iterator[str]:
    with scratch_database("joey_orch") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO orchestrations (workspace_id, name, version, sha256, size_bytes, files, status) "
                "SELECT id, 'job', 1, 'x', 1, 1, 'ready' FROM workspaces WHERE name = 'default'"
            )
        yield url


def task(url: str, kind: str, schedule: str = "", created_ago: timedelta = timedelta(0)) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO tasks (workspace_id, name, orchestration, kind, schedule, owner, created_at) "
            "SELECT id, %s, 'job', %s, %s, 'admin', now() - %s FROM workspaces WHERE name = 'default' "
            "RETURNING id",
            (f"t-{kind}-{schedule}", kind, schedule, created_ago),
        ).fetchone()
    assert row is not None
    return int(row[0])


def runs(url: str, task_id: int) -> list[tuple[datetime | None, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT instant, status FROM task_runs WHERE task_id = %s ORDER BY id", (task_id,)
        ).fetchall()


def test_after_downtime_the_latest_missed_instant_runs_once_or_none_is(url: str) -> None:
    # Created a day ago, hourly, and no orchestrator ran since: 24 instants were missed.
    hourly = task(url, "scheduled", "0 * * * *", timedelta(days=1))
    store = OrchestratorStore(url, "orch-test", 5.0, BACKOFF)
    store.open()
    try:
        skipping = OrchestratorStore(url, "orch-skip", 5.0, BACKOFF)
        skipping.open()
        try:
            assert skipping.fire_schedules(catch_up=False, grace_s=60) == 0  # all of them are too late
        finally:
            skipping.close()
        assert runs(url, hourly) == []
        assert store.fire_schedules(catch_up=True, grace_s=60) == 1
        assert store.fire_schedules(catch_up=True, grace_s=60) == 0  # once, however often it looks
        latest = core.latest_instant("0 * * * *", datetime.now(UTC))
        assert runs(url, hourly) == [(latest, "pending")]
    finally:
        store.close()


def test_two_orchestrators_never_run_one_task_twice_at_a_time(url: str) -> None:
    once = task(url, "once")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO task_runs (task_id) VALUES (%s), (%s)", (once, once))
    stores = [OrchestratorStore(url, f"orch-{i}", 5.0, BACKOFF) for i in range(2)]
    for store in stores:
        store.open()
    try:
        claimed = [store.claim() for store in stores]
        assert sum(c is not None for c in claimed) == 1
        winner = next(c for c in claimed if c is not None)
        loser = stores[claimed.index(None)]
        assert loser.claim() is None  # the other run waits for the running one
        assert stores[claimed.index(winner)].finish(winner.id, core.SUCCESS, 0, "")
        assert loser.claim() is not None
    finally:
        for store in stores:
            store.close()


def test_a_tasks_old_ended_runs_are_pruned_with_their_lines_and_live_ones_never(url: str) -> None:
    busy, quiet = task(url, "once"), task(url, "continuous")
    with psycopg.connect(url, autocommit=True) as conn:
        # busy: 5 ended runs, then a running one and a pending one; quiet: as many runs as are kept.
        statuses = ["success", "failure", "killed", "timed_out", "success", "running", "pending"]
        ids = [
            conn.execute(
                "INSERT INTO task_runs (task_id, attempt, status) VALUES (%s, %s, %s) RETURNING id",
                (busy, i + 1, status),
            ).fetchone()[0]  # type: ignore[index]
            for i, status in enumerate(statuses)
        ]
        conn.execute(
            "INSERT INTO task_runs (task_id, status) VALUES (%s, 'success'), (%s, 'success'), "
            "(%s, 'success')",
            (quiet, quiet, quiet),
        )
        conn.execute(
            "INSERT INTO task_run_logs (run_id, seq, stream, line) "
            "SELECT id, 1, 'stdout', 'hi' FROM task_runs"
        )
    store = OrchestratorStore(url, "orch-test", 5.0, BACKOFF)
    store.open()
    try:
        assert store.prune(keep=3) == 4  # busy's runs older than its latest 3, quiet's none
        assert store.prune(keep=3) == 0
    finally:
        store.close()
    with psycopg.connect(url) as conn:
        left = conn.execute(
            "SELECT r.id, count(l.seq) FROM task_runs r LEFT JOIN task_run_logs l ON l.run_id = r.id "
            "WHERE r.task_id = %s GROUP BY r.id ORDER BY r.id",
            (busy,),
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM task_runs WHERE task_id = %s", (quiet,)).fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM task_run_logs").fetchone() == (len(left) + 3,)
    assert left == [(i, 1) for i in ids[4:]]


def test_a_version_is_packaged_by_one_orchestrator_holding_no_transaction_open(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE orchestrations SET status = 'packaging'")
    stores = [OrchestratorStore(url, f"orch-{i}", 5.0, BACKOFF) for i in range(2)]
    for store in stores:
        store.open()
    try:
        with stores[0].packaging() as found, psycopg.connect(url, autocommit=True) as conn:
            assert found is not None and found[0].name == "job"
            with stores[1].packaging() as other:
                assert other is None  # the version is being packaged
            # A transaction with an id held for the build would hold back every Postgres source of
            # the server (they wait for every transaction older than a row to end).
            holding = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_xid IS NOT NULL"
            ).fetchone()
            assert holding == (0,)
            stores[0].packaged(found[1], found[0], core.READY, "built")
        with stores[1].packaging() as other:
            assert other is None  # ready now: nothing waits
    finally:
        for store in stores:
            store.close()
