"""The live assayer as a `joey serve assayer` process, fed through joey.logs and the real logger."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from joey.client import Client
from joey_core import assays, topics
from joey_core.kafka import admin_client, consumer_config, topic_partitions
from joey_core.settings import CommonSettings
from tests.conftest import ServiceProcess, Stack, wait_service_ready, wait_until
from tests.logger.helpers import LogProducer, log_record

MINUTE = timedelta(minutes=1)
WINDOWS_WITH_DATA = 30


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, iris_model: Path) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    client.build_pipeline("live").add_model_step("iris").create()
    return client


def results_in_db(database_url: str, workspace: str) -> list[tuple[datetime, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT r.window_start, r.status FROM assay_results r JOIN assays a ON a.id = r.assay_id "
            "JOIN workspaces w ON w.id = a.workspace_id WHERE w.name = %s ORDER BY r.window_start",
            (workspace,),
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def read_keys(
    settings: CommonSettings, topic: str, prefix: str, until: Callable[[set[str]], bool]
) -> set[str]:
    consumer = Consumer(consumer_config(settings, f"assay-test-{secrets.token_hex(4)}"))
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    keys: set[str] = set()

    def done() -> bool:
        for message in consumer.consume(500, timeout=0.2):
            key = (message.key() or b"").decode()
            if not message.error() and key.startswith(prefix):
                keys.add(key)
                assert json.loads(message.value())["window_start"] in key
        return until(keys)

    try:
        wait_until(done, 60, f"results on {topic}")
    finally:
        consumer.close()
    return keys


def test_live_results_survive_kill9_and_equal_interactive_ones(
    client: Client,
    settings: CommonSettings,
    database_url: str,
    env: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    now = datetime.now(UTC)
    t0 = now.replace(second=0, microsecond=0) - 40 * MINUTE
    rng = np.random.default_rng(11)
    baseline = rng.normal(3.0, 1.0, 200)
    values = {k: np.round(rng.normal(3.0 + k / 10, 1.0, 12), 4) for k in range(WINDOWS_WITH_DATA)}
    records = [
        log_record(
            "live",
            k * 100 + i,
            workspace=client.workspace,
            time=t0 + k * MINUTE + timedelta(seconds=i * 4),
            inputs=json.dumps({"features": [5.0, 3.0, float(v), 1.0]}),
        )
        for k, window in values.items()
        for i, v in enumerate(window)
    ]
    producer = LogProducer(settings)
    with psycopg.connect(database_url) as conn:

        def stored_once(count: int) -> None:
            def stored() -> int:
                row = conn.execute(
                    "SELECT count(*) FROM inference_logs WHERE workspace = %s", (client.workspace,)
                ).fetchone()
                return int(row[0]) if row else 0

            wait_until(lambda: stored() == count, 60, f"the logger to store {count} records once")

        # The first half is logged before the assay exists (the assayer's backfill counts it),
        # the second half after (the loggers count it as they store it). Every record is sent
        # twice, and some of the first half again later: a replayed log record is one row,
        # counted once.
        half = len(records) // 2
        producer.records(records[:half])
        producer.records(records[:half])
        stored_once(half)
        assay = (
            client.build_assay("live-drift", "live", "input features 2", baseline_data=baseline.tolist())
            .add_width(minutes=1)
            .add_start(t0)
            .add_warning_threshold(0.1)
            .add_alert_threshold(0.4)
            # Windows of 12 values, below the default min_count: judged all the same, as Wallaroo does.
            .add_min_count(0)
        )
        assay.upload()
        producer.records(records[half:])
        producer.records(records[half - 30 :])
        stored_once(len(records))

    tuning = {"JOEY_TICK_S": "0.2", "JOEY_MAX_WINDOWS_PER_TICK": "1", "JOEY_ALLOWED_LATENESS_S": "1"}
    first = service_factory("assayer", **tuning)
    wait_until(lambda: len(results_in_db(database_url, client.workspace)) >= 5, 60, "the first results")
    first.kill9()
    assert len(results_in_db(database_url, client.workspace)) < WINDOWS_WITH_DATA
    # One window a tick, so the kill lands mid-way; the second only has the rest to score, sooner.
    second = service_factory("assayer", **tuning | {"JOEY_TICK_S": "0.05"})
    wait_service_ready(env, "assayer")
    wait_until(
        lambda: len(results_in_db(database_url, client.workspace)) >= 40, 120, "every past window scored"
    )
    second.stop()

    rows = results_in_db(database_url, client.workspace)
    starts = [start for start, _ in rows]
    assert starts == [t0 + k * MINUTE for k in range(len(rows))]  # one per window, no gap
    assert {status for _, status in rows[WINDOWS_WITH_DATA:]} == {"NoData"}

    live = client.get_assay_results("live-drift", end=t0 + WINDOWS_WITH_DATA * MINUTE)
    interactive = assay.interactive_run(end=t0 + WINDOWS_WITH_DATA * MINUTE)
    assert len(live) == len(interactive) == WINDOWS_WITH_DATA
    for k, (a, b) in enumerate(zip(live, interactive, strict=True)):
        assert (a.window_start, a.window_end) == (b.window_start, b.window_end)
        assert (a.score, a.scores, a.status, a.bin_index) == (b.score, b.scores, b.status, b.bin_index)
        assert a.window_summary == b.window_summary and a.baseline_summary == b.baseline_summary
        expected = assays.score(baseline, values[k], alert_threshold=0.4, warning_threshold=0.1)
        assert a.score == expected.score and a.window_summary.count == 12
    assert live.to_dataframe()["status"].isin(["Ok", "Warning", "Alert"]).all()

    prefix = f"{client.workspace}/live-drift/"
    expected_keys = {f"{prefix}{r.window_start.isoformat()}" for r in live}
    assert read_keys(settings, topics.ASSAY_RESULTS, prefix, lambda k: k >= expected_keys) == expected_keys
    alerting = {f"{prefix}{r.window_start.isoformat()}" for r in live if r.status in ("Warning", "Alert")}
    assert alerting, "the drift grows past the warning threshold"
    assert read_keys(settings, topics.ASSAY_ALERTS, prefix, lambda k: k >= alerting) == alerting


def test_event_time_closes_a_window_before_the_wall_clock(
    client: Client,
    settings: CommonSettings,
    database_url: str,
    env: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """With 5 minutes of allowed lateness, a record 5 minutes past the windows' end closes them at
    once; under the default min_count, live and interactive agree window by window on NoData."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=100)
    end = start + timedelta(seconds=10)
    window, second = [1.0, 2.0, 2.5, 3.0, 4.0, 8.0], [2.0, 3.0, 9.0]
    inputs = [json.dumps({"features": [5.0, 3.0, v, 1.0]}) for v in window + second]
    times = [start + timedelta(seconds=i) for i in range(len(window))]
    times += [end + timedelta(seconds=i) for i in range(len(second))]
    # A group of its own: the embedded broker can be slow to hand over a group whose last members
    # were killed and stopped back to back (the previous test does both).
    assayer = service_factory(
        "assayer",
        JOEY_TICK_S="0.2",
        JOEY_ALLOWED_LATENESS_S="300",
        JOEY_ASSAYER_GROUP=f"assayer-{secrets.token_hex(3)}",
    )
    wait_service_ready(env, "assayer")
    assay = client.build_assay(
        "watermark", "live", "input features 2", baseline_data=[1.0, 2.0, 3.0, 4.0, 5.0]
    ).add_width(seconds=10)
    assay.add_start(start).upload()
    producer = LogProducer(settings)
    producer.records(
        log_record("live", i, workspace=client.workspace, time=time, inputs=text)
        for i, (time, text) in enumerate(zip(times, inputs, strict=True))
    )
    # Event time moves past the second window's end + lateness long before the wall clock does
    # (in about 3.5 minutes).
    later = end + timedelta(seconds=10 + 301)
    producer.records([log_record("live", 99, workspace=client.workspace, time=later, inputs=inputs[0])])
    wait_until(
        lambda: len(results_in_db(database_url, client.workspace)) == 2,
        60,
        "the windows closed by event time",
    )
    assert datetime.now(UTC) < end + timedelta(seconds=300)
    live = client.get_assay_results("watermark")
    result = live[0]
    assert (result.window_start, result.window_end) == (start, end)
    assert result.score == assays.score([1.0, 2.0, 3.0, 4.0, 5.0], window).score
    # Six and three values, below the default min_count: scored, NoData rather than judged, and
    # published as results (alerts are Warning and Alert only).
    assert [(r.status, r.window_summary.count) for r in live] == [("NoData", 6), ("NoData", 3)]
    interactive = assay.interactive_run(end=end + timedelta(seconds=10))
    assert len(interactive) == len(live) and interactive.min_count == live.min_count == 30
    for a, b in zip(live, interactive, strict=True):
        assert (a.window_start, a.window_end, a.status) == (b.window_start, b.window_end, b.status)
        assert (a.score, a.scores, a.bin_index, a.window_summary) == (
            b.score,
            b.scores,
            b.bin_index,
            b.window_summary,
        )
    key = f"{client.workspace}/watermark/{start.isoformat()}"
    assert read_keys(settings, topics.ASSAY_RESULTS, key, lambda k: key in k) == {key}
    assayer.stop()


def test_a_window_of_a_deleted_assay_is_dropped(client: Client, database_url: str) -> None:
    from joey_assayer.store import AssayerStore

    start = datetime(2025, 1, 1, tzinfo=UTC)
    client.build_assay("gone", "live", "input features 2", baseline_data=[1.0, 2.0]).add_start(start).upload()
    store = AssayerStore(database_url)
    try:
        (assay,) = [a for a in store.active_assays() if a.definition.workspace == client.workspace]
        client.delete_assay("gone")
        assert store.score_window(assay, start, start + timedelta(days=1)) is False
    finally:
        store.close()


def test_the_wall_clock_closes_windows_only_up_to_what_was_read(
    settings: CommonSettings, database_url: str
) -> None:
    from joey_assayer.service import Assayer
    from joey_assayer.settings import AssayerSettings
    from joey_assayer.store import AssayerStore

    LogProducer(settings).records(log_record("unread", i) for i in range(20))
    assayer_settings = AssayerSettings(**settings.model_dump())
    store = AssayerStore(database_url)
    consumer = Consumer(consumer_config(settings, f"assay-test-{secrets.token_hex(4)}"))
    try:
        assayer = Assayer(assayer_settings, store)
        partitions = topic_partitions(admin_client(settings), [topics.LOGS])[topics.LOGS]
        assigned = [TopicPartition(topics.LOGS, p) for p in range(partitions)]
        consumer.assign(assigned)
        before = datetime.now(UTC)
        assayer.track_reading(consumer, assigned)  # marks the ends of joey.logs now
        assayer.track_reading(consumer, assigned)
        assert assayer.read_until is None  # nothing read yet: the wall clock closes nothing

        def read_to_the_mark() -> bool:
            assayer.observe(consumer.consume(1000, timeout=0.2))
            assayer.track_reading(consumer, assigned)
            return assayer.read_until is not None

        wait_until(read_to_the_mark, 60, "the assayer to read up to its mark")
        assert assayer.read_until is not None and before <= assayer.read_until <= datetime.now(UTC)
    finally:
        consumer.close()
        store.close()
