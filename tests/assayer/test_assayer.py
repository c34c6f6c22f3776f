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

from joey import assays, topics
from joey.kafka import consumer_config
from joey.sdk import Client
from joey.settings import CommonSettings
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
    # Every record twice: a replayed log record is one row, so it is counted once.
    producer.records(records)
    producer.records(records)
    with psycopg.connect(database_url) as conn:

        def stored() -> int:
            row = conn.execute(
                "SELECT count(*) FROM inference_logs WHERE workspace = %s", (client.workspace,)
            ).fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: stored() == len(records), 60, "the logger to store every record once")

    assay = (
        client.build_assay("live-drift", "live", "input features 2", baseline_data=baseline.tolist())
        .add_width(minutes=1)
        .add_start(t0)
        .add_warning_threshold(0.1)
        .add_alert_threshold(0.4)
    )
    assay.upload()

    tuning = {"JOEY_TICK_S": "0.2", "JOEY_MAX_WINDOWS_PER_TICK": "1", "JOEY_ALLOWED_LATENESS_S": "1"}
    first = service_factory("assayer", **tuning)
    wait_until(lambda: len(results_in_db(database_url, client.workspace)) >= 5, 60, "the first results")
    first.kill9()
    assert len(results_in_db(database_url, client.workspace)) < WINDOWS_WITH_DATA
    second = service_factory("assayer", **tuning)
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
