"""An upgrade of the engine from one log record per inference to batch records, with old records
still in joey.logs: the logger stores every input's row once and counts it once, the assayer's
watermark covers both formats."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from joey_assayer.service import Assayer
from joey_assayer.settings import AssayerSettings
from joey_assayer.store import AssayerStore
from joey_core import topics
from joey_core.kafka import consumer_config
from joey_core.settings import CommonSettings
from joey_logger.settings import LoggerSettings
from tests.conftest import wait_until
from tests.joey_core.assays.test_panes import create_assay, definition, stored_counts
from tests.logger.helpers import InProcessLogger, LogProducer, count_rows, is_live, log_record

OLD, NEW = 300, 700


def start_logger(settings: LoggerSettings) -> InProcessLogger:
    running = InProcessLogger(settings).start()
    wait_until(lambda: is_live(settings) or not running.alive(), 30, "logger heartbeat")
    assert running.alive(), f"logger failed at start: {running.error!r}"
    return running


def test_old_records_then_batched_ones_across_a_logger_restart_are_each_stored_and_counted_once(
    logger_settings: LoggerSettings, settings: CommonSettings, produce: LogProducer, pipeline: str
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    # Fewer rows per transaction than a batch record holds: a record's rows span transactions.
    logger_settings = logger_settings.model_copy(update={"batch_size": 100})
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    rng = np.random.default_rng(14)
    values = np.round(rng.normal(2.5, 1.0, OLD + NEW), 3)
    records = [
        log_record(
            pipeline,
            i,
            time=t0 + timedelta(milliseconds=100 * i),
            inputs=json.dumps({"features": [5.0, 3.0, float(v), 1.0]}),
        )
        for i, v in enumerate(values)
    ]
    old, new = records[:OLD], records[OLD:]
    assay = definition(name=f"upgrade-{secrets.token_hex(3)}", pipeline=pipeline, start=t0)
    with psycopg.connect(database_url) as conn:
        assay_id = create_assay(conn, assay)  # before any row: the loggers count every one

    reader = Consumer(consumer_config(settings, f"upgrade-{secrets.token_hex(4)}"))
    reader.assign([TopicPartition(topics.LOGS, p, OFFSET_BEGINNING) for p in range(produce.partitions)])
    store = AssayerStore(database_url)
    assayer = Assayer(AssayerSettings(**settings.model_dump()), store)

    def watermark_reaches(at: datetime) -> bool:
        assayer.observe(reader.consume(1000, timeout=0.2))
        return assayer.watermarks.get(("default", pipeline)) == at

    try:
        produce.records(old)
        first = start_logger(logger_settings)
        wait_until(lambda: count_rows(database_url, pipeline) == (OLD, OLD), 60, "the old records' rows")
        wait_until(lambda: watermark_reaches(old[-1]["time"]), 60, "the watermark of the old records")
        first.stop()

        # The upgraded engine replays the last old inputs (it crashed mid-upgrade) and logs in batches,
        # shuffled within each batch: a batch's latest time need not be its last entry's.
        batched = [*old[-50:], *new]
        order = rng.permutation(len(batched))
        produce.batches([batched[i] for i in order], size=256)
        second = start_logger(logger_settings)
        total = OLD + NEW
        wait_until(lambda: count_rows(database_url, pipeline) == (total, total), 60, "every input's row")
        wait_until(lambda: watermark_reaches(new[-1]["time"]), 60, "the watermark of the batch records")

        # A replay of both formats (a redelivery after a rebalance) adds no row; markers, produced
        # last on every partition, show it has all been handled.
        produce.records(old[:20])
        produce.batches(new[:300], size=100)
        markers = f"{pipeline}-marker"
        produce.records(log_record(markers, p) for p in range(produce.partitions))
        wait_until(lambda: count_rows(database_url, markers)[0] == produce.partitions, 60, "marker rows")
        assert count_rows(database_url, pipeline) == (total, total)
        second.stop()
    finally:
        reader.close()
        store.close()

    with psycopg.connect(database_url) as conn:
        counted = stored_counts(conn, assay_id)
    assert sum(c.count for c in counted.values()) == total  # every row counted once, whatever its format
