"""Live per-window counts: which windows a row falls in, adding counts concurrently, and the
split between rows counted by the assayer's backfill and rows counted by the loggers."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from joey_core.assays import panes as assay_panes
from joey_core.assays.panes import add_counts, backfill, hold_for_change, hold_for_logging
from joey_core.assays.runs import EPOCH, MICROSECOND, AssayDefinition, IoPath, window_results
from joey_core.assays.streaming import WindowCounts
from joey_logger.sink import PostgresLogSink
from tests.conftest import scratch_database, wait_until
from tests.logger.helpers import log_record

T0 = datetime(2025, 6, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with scratch_database("joey_windows") as url:
        yield url


def definition(**fields: Any) -> AssayDefinition:
    base = AssayDefinition(
        workspace="default", name="a", pipeline="p", iopath=IoPath.parse("input features 2")
    )
    return replace(base, **({"start": T0} | fields)).with_baseline([1.0, 2.0, 3.0, 4.0])


def create_assay(conn: psycopg.Connection[Any], d: AssayDefinition) -> int:
    """What the registry does: log rows stored so far are left to the backfill."""
    with conn.transaction():
        stored = hold_for_change(conn)
        row = conn.execute(
            "INSERT INTO assays (workspace_id, name, pipeline, definition, backfill_until) "
            "SELECT id, %s, %s, %s, %s FROM workspaces WHERE name = %s RETURNING id",
            (d.name, d.pipeline, Jsonb(d.to_json()), stored, d.workspace),
        ).fetchone()
    assert row is not None
    return int(row[0])


def stored_counts(conn: psycopg.Connection[Any], assay_id: int) -> dict[datetime, WindowCounts]:
    rows = conn.execute(
        "SELECT pane_start, counts FROM assay_panes WHERE assay_id = %s", (assay_id,)
    ).fetchall()
    return {r[0]: WindowCounts.from_bytes(r[1]) for r in rows}


def test_a_time_falls_in_one_pane_and_windows_are_made_of_panes() -> None:
    times = [T0 - MINUTE, T0, T0 + 90 * timedelta(seconds=1), T0 + 5 * MINUTE, T0 + 7 * MINUTE]
    micros = np.array([(t - EPOCH) // MICROSECOND for t in times], dtype=np.int64)

    def panes(d: AssayDefinition) -> dict[datetime, list[int]]:
        return {start: positions.tolist() for start, positions in d.panes_of(micros)}

    tumbling = definition(width=2 * MINUTE)
    assert tumbling.pane == 2 * MINUTE
    assert panes(tumbling) == {T0: [1, 2], T0 + 4 * MINUTE: [3], T0 + 6 * MINUTE: [4]}
    sliding = definition(width=3 * MINUTE, interval=2 * MINUTE)  # windows [0, 3), [2, 5), [4, 7), ...
    assert sliding.pane == MINUTE
    assert panes(sliding) == {T0: [1], T0 + MINUTE: [2], T0 + 5 * MINUTE: [3], T0 + 7 * MINUTE: [4]}
    assert sliding.panes_in(T0 + 4 * MINUTE) == [T0 + k * MINUTE for k in (4, 5, 6)]
    gapped = definition(width=MINUTE, interval=3 * MINUTE)  # windows [0, 1), [3, 4), [6, 7) minutes
    assert panes(gapped) == {T0: [1]}

    bins = tumbling.baseline.bins if tumbling.baseline else None
    assert bins is not None
    values = np.arange(len(times), dtype=np.float64)
    counted: dict[datetime, WindowCounts] = {}
    sliding.count(micros, values, counted)
    window = sliding.window_counts(T0 + 4 * MINUTE, counted)  # panes 4, 5, 6: only the time at 5 min
    assert window == WindowCounts.of([3.0], bins)


def test_concurrent_additions_to_the_same_windows_all_count(url: str) -> None:
    d = definition(name=f"c-{secrets.token_hex(3)}")
    bins = d.baseline.bins if d.baseline else None
    assert bins is not None
    with psycopg.connect(url) as conn:
        assay_id = create_assay(conn, d)
    starts = [T0 + k * MINUTE for k in range(3)]
    rng = np.random.default_rng(1)
    batches = [[rng.normal(2, 1, 50) for _ in starts] for _ in range(40)]

    def add(mine: list[list[np.ndarray]], reverse: bool) -> None:
        with psycopg.connect(url) as conn:
            for batch in mine:
                keys = list(zip(starts, batch, strict=True))
                # Built in opposite orders by the two threads: add_counts locks in key order anyway.
                updates = {
                    (assay_id, start): WindowCounts.of(v, bins) for start, v in keys[:: -1 if reverse else 1]
                }
                with conn.transaction():
                    add_counts(conn, updates)

    threads = [threading.Thread(target=add, args=(batches[i::2], i == 1)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with psycopg.connect(url) as conn:
        stored = stored_counts(conn, assay_id)
    for k, start in enumerate(starts):
        assert stored[start] == WindowCounts.of(np.concatenate([batch[k] for batch in batches]), bins)


def test_rows_stored_before_and_after_an_assay_appears_are_each_counted_once(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    d = definition(name=f"b-{secrets.token_hex(3)}", pipeline=pipeline, width=10 * MINUTE)
    values = np.round(np.random.default_rng(2).normal(2.5, 1, 300), 6)

    def record(i: int) -> dict[str, Any]:
        inputs = f'{{"features": [0, 0, {float(values[i])!r}, 0]}}'
        return log_record(pipeline, i, time=T0 + i * timedelta(seconds=6), inputs=inputs)

    sink = PostgresLogSink(url)
    sink.open()
    try:
        sink.write([record(i) for i in range(120)])
        with psycopg.connect(url) as conn:
            assay_id = create_assay(conn, d)
        sink.write([record(i) for i in range(100, 300)])  # 20 replays, 180 new
        sink.write([record(i) for i in range(0, 300, 7)])  # all replays
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        live_only = sum(c.count for c in stored_counts(conn, assay_id).values())
        assert live_only == 180
        assert backfill(conn, assay_id, d, T0) is True
        assert backfill(conn, assay_id, d, T0) is False  # once per assay
        stored = stored_counts(conn, assay_id)
        interactive = window_results(conn, d, T0 + 30 * MINUTE)
    assert sorted(stored) == [r.window_start for r in interactive] == [T0 + k * 10 * MINUTE for k in range(3)]
    for k, result in enumerate(interactive):
        counts = stored[result.window_start]
        assert counts.summary(result.baseline.bins, "density") == result.window
        assert counts.count == 100
        assert counts == WindowCounts.of(values[k * 100 : (k + 1) * 100], result.baseline.bins)


def test_creating_an_assay_waits_for_the_logs_being_stored(url: str) -> None:
    """Otherwise rows committed just after the creation would be counted by nobody."""
    created = threading.Event()
    with psycopg.connect(url) as logger:
        hold_for_logging(logger)  # a logger's transaction in flight

        def create() -> None:
            with psycopg.connect(url) as conn:
                create_assay(conn, definition(name=f"w-{secrets.token_hex(3)}"))
            created.set()

        thread = threading.Thread(target=create)
        thread.start()
        with psycopg.connect(url) as observer:
            wait_until(
                lambda: (
                    observer.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ).fetchone()
                    == (1,)
                ),
                10,
                "the creation to wait for the advisory lock",
            )
        assert not created.is_set()
        logger.commit()
    thread.join(10)
    assert created.is_set()


def test_a_deleted_assay_is_no_longer_counted_and_logging_goes_on(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    d = definition(name=f"d-{secrets.token_hex(3)}", pipeline=pipeline)
    sink = PostgresLogSink(url)
    sink.open()
    try:
        with psycopg.connect(url) as conn:
            assay_id = create_assay(conn, d)
        assert sink.write([log_record(pipeline, i, time=T0) for i in range(10)]).written == 10
        with psycopg.connect(url) as conn:
            assert stored_counts(conn, assay_id)[T0].count == 10
            with conn.transaction():
                hold_for_change(conn)
                conn.execute("DELETE FROM assays WHERE id = %s", (assay_id,))
        # The sink read the deleted assay's definition before; it must not count into it now.
        assert sink.write([log_record(pipeline, i, time=T0) for i in range(10, 20)]).written == 10
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        assert stored_counts(conn, assay_id) == {}
        row = conn.execute("SELECT count(*) FROM inference_logs WHERE pipeline = %s", (pipeline,)).fetchone()
        assert row == (20,)


def test_a_backfill_in_progress_does_not_hold_up_the_loggers(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    d = definition(name=f"f-{secrets.token_hex(3)}", pipeline=pipeline)
    with psycopg.connect(url) as conn:
        assay_id = create_assay(conn, d)
    written = threading.Event()
    with psycopg.connect(url) as assayer:
        # What backfill() holds for its whole transaction.
        assayer.execute("SELECT backfill_until FROM assays WHERE id = %s FOR NO KEY UPDATE", (assay_id,))

        def log() -> None:
            sink = PostgresLogSink(url)
            sink.open()
            try:
                sink.write([log_record(pipeline, i, time=T0) for i in range(5)])
            finally:
                sink.close()
            written.set()

        thread = threading.Thread(target=log)
        thread.start()
        assert written.wait(10), "the logger waited for the backfill's lock"
        thread.join()
        assayer.rollback()
    with psycopg.connect(url) as conn:
        assert stored_counts(conn, assay_id)[T0].count == 5


def test_numbers_beyond_float64_are_stored_but_not_counted(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    d = definition(name=f"r-{secrets.token_hex(3)}", pipeline=pipeline)
    texts = ["1e400", "-1e400", "1e-400", "0", "5e-324", "1.7976931348623157e308", "2.5"]

    def record(i: int, text: str) -> dict[str, Any]:
        return log_record(pipeline, i, time=T0, inputs=f'{{"features": [0, 0, {text}, 0]}}')

    sink = PostgresLogSink(url)
    sink.open()
    try:
        sink.write([record(i, text) for i, text in enumerate(texts[:3])])  # stored before: the backfill's
        with psycopg.connect(url) as conn:
            assay_id = create_assay(conn, d)
        written = sink.write([record(i, text) for i, text in enumerate(texts) if i >= 3])
    finally:
        sink.close()
    assert written.written == 4
    with psycopg.connect(url) as conn:
        assert backfill(conn, assay_id, d, T0) is True
        counts = stored_counts(conn, assay_id)[T0]
        (result,) = window_results(conn, d, T0 + d.width)
    assert counts.count == 4 and counts.values == [0.0, 5e-324, 2.5, 1.7976931348623157e308]
    assert result.window.count == 4 and result.window.max == 1.7976931348623157e308


def test_loggers_racing_to_create_the_same_panes_do_not_deadlock(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads before A1 creates pane e; A2 then locks e; B inserts pane m and finds e taken;
    A2 inserts m. Without rolling back B's round, B would wait on e holding m: a deadlock."""
    d = definition(name=f"race-{secrets.token_hex(3)}")
    bins = d.baseline.bins if d.baseline else None
    assert bins is not None
    with psycopg.connect(url) as conn:
        assay_id = create_assay(conn, d)
    m, e = (assay_id, T0), (assay_id, T0 + MINUTE)
    paused = {name: (threading.Event(), threading.Event()) for name in ("B", "A2")}
    calls: dict[str, int] = {}
    original = assay_panes._rows

    def rows(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        found = original(conn, query, params)
        name = threading.current_thread().name
        calls[name] = calls.get(name, 0) + 1
        if name in paused and calls[name] == 1:  # right after its first SELECT ... FOR UPDATE
            reached, go = paused[name]
            reached.set()
            go.wait(10)
        return found

    monkeypatch.setattr(assay_panes, "_rows", rows)
    outcome: dict[str, str] = {}

    def add(name: str, keys: list[tuple[int, datetime]]) -> None:
        try:
            with psycopg.connect(url) as conn, conn.transaction():
                add_counts(conn, {k: WindowCounts.of([1.5], bins) for k in keys})
            outcome[name] = "ok"
        except psycopg.Error as exc:
            outcome[name] = type(exc).__name__

    b = threading.Thread(target=add, name="B", args=("B", [m, e]))
    b.start()
    assert paused["B"][0].wait(10)  # B saw neither pane
    add("A1", [e])  # another batch creates e
    a2 = threading.Thread(target=add, name="A2", args=("A2", [m, e]))
    a2.start()
    assert paused["A2"][0].wait(10)  # A2 holds e and did not see m
    paused["B"][1].set()
    with psycopg.connect(url) as observer:
        wait_until(
            lambda: observer.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone() != (0,),
            10,
            "B to wait for pane e",
        )
    paused["A2"][1].set()
    b.join(30)
    a2.join(30)
    assert outcome == {"A1": "ok", "B": "ok", "A2": "ok"}
    with psycopg.connect(url) as conn:
        stored = stored_counts(conn, assay_id)
    assert (stored[T0].count, stored[T0 + MINUTE].count) == (2, 3)


def failures(conn: psycopg.Connection[Any], *ids: int) -> list[str | None]:
    rows = dict(conn.execute("SELECT id, failure FROM assays WHERE id = ANY(%s)", (list(ids),)).fetchall())
    return [rows[i] for i in ids]


def test_an_assay_that_cannot_be_counted_fails_alone_and_the_rows_are_stored(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    good = definition(name=f"g-{secrets.token_hex(3)}", pipeline=pipeline)
    with psycopg.connect(url) as conn:
        good_id = create_assay(conn, good)
        # Written around the registry's checks: an index beyond int4 (its SQL fails) and a
        # definition that cannot even be read.
        beyond_int4 = create_assay(
            conn, replace(good, name=f"i-{secrets.token_hex(3)}", iopath=IoPath("input", "features", 2**40))
        )
        unreadable = create_assay(conn, replace(good, name=f"u-{secrets.token_hex(3)}"))
        conn.execute("UPDATE assays SET definition = definition - 'summarizer' WHERE id = %s", (unreadable,))
        conn.commit()
    sink = PostgresLogSink(url)
    sink.open()
    try:
        assert sink.write([log_record(pipeline, i, time=T0) for i in range(10)]).written == 10
        # Failed assays are left out from then on: the next batch takes the quick path again.
        assert sink.write([log_record(pipeline, i, time=T0) for i in range(10, 15)]).written == 5
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        assert stored_counts(conn, good_id)[T0].count == 15
        assert stored_counts(conn, beyond_int4) == {} and stored_counts(conn, unreadable) == {}
        good_failure, index_failure, read_failure = failures(conn, good_id, beyond_int4, unreadable)
        row = conn.execute("SELECT count(*) FROM inference_logs WHERE pipeline = %s", (pipeline,)).fetchone()
    assert row == (15,)
    assert good_failure is None
    assert index_failure is not None and "UndefinedFunction" in index_failure and "jsonb" in index_failure
    assert read_failure is not None and "KeyError" in read_failure and "summarizer" in read_failure


def test_a_backfill_that_cannot_count_fails_its_assay(url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    d = definition(
        name=f"b-{secrets.token_hex(3)}", pipeline=pipeline, iopath=IoPath("input", "features", 2**40)
    )
    sink = PostgresLogSink(url)
    sink.open()
    try:
        sink.write([log_record(pipeline, i, time=T0) for i in range(3)])  # stored before: the backfill's
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        assay_id = create_assay(conn, d)
        assert backfill(conn, assay_id, d, T0) is False
        (failure,) = failures(conn, assay_id)
        assert failure is not None and "UndefinedFunction" in failure
        assert backfill(conn, assay_id, d, T0) is False  # a failed assay is not tried again
