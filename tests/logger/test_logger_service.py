"""LoggerService in-process against the real broker, Postgres and Redis."""

from __future__ import annotations

import secrets

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import REGISTRY
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from joey_core import db, topics
from joey_core.kafka import ConsumedRecord, consumer_config
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    encode_log,
    header_value,
)
from joey_core.settings import CommonSettings
from joey_logger.service import DROPPED_HEADER, ENTRY_HEADER, REASON_HEADER, SOURCE_HEADER
from joey_logger.settings import LoggerSettings
from tests.conftest import POSTGRES_ADMIN_URL, wait_until
from tests.logger.helpers import (
    InProcessLogger,
    LogProducer,
    count_rows,
    is_live,
    log_record,
    read_dead_letters,
)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_replays_add_no_rows_and_bad_records_are_dead_lettered(
    logger: InProcessLogger,
    logger_settings: LoggerSettings,
    settings: CommonSettings,
    produce: LogProducer,
    pipeline: str,
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    n = 400
    records = [log_record(pipeline, i) for i in range(n)]
    produce.records(records)
    wait_until(lambda: count_rows(database_url, pipeline) == (n, n), 60, f"{n} rows")

    produce.records(records)
    undecodable = {f"undecodable {pipeline} #{i}".encode() for i in range(3)}
    refused = encode_log(log_record(pipeline, n, inputs="{not json"))  # decodes, but is no jsonb
    produce.values([*sorted(undecodable), refused])
    # One marker per partition, produced last: once every marker has a row, every record before
    # it on its partition has been handled.
    markers = f"{pipeline}-marker"
    produce.records(log_record(markers, p) for p in range(produce.partitions))

    found = read_dead_letters(settings, {*undecodable, refused}, timeout=60)
    for value, message in found.items():
        headers = ConsumedRecord.of(message).headers
        expected = "rejected by the postgres sink" if value == refused else "not an Avro joey.v1.InferenceLog"
        assert expected in (header_value(headers, REASON_HEADER) or ""), headers
        assert (header_value(headers, SOURCE_HEADER) or "").startswith("joey.logs["), headers
    wait_until(lambda: count_rows(database_url, markers)[0] == produce.partitions, 60, "marker rows")
    assert count_rows(database_url, pipeline) == (n, n)
    assert logger.alive()

    logger.stop()
    assert not is_live(logger_settings), "a cleanly stopped logger retires its heartbeat"


def drop_database(url: str) -> None:
    name = str(conninfo_to_dict(url)["dbname"])
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_records_wait_out_a_database_outage(
    logger: InProcessLogger, logger_settings: LoggerSettings, produce: LogProducer, pipeline: str
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    drop_database(database_url)
    retried = sample("joey_logger_batches_total", outcome="retried")
    n = 300
    produce.records(log_record(pipeline, i) for i in range(n))
    wait_until(
        lambda: sample("joey_logger_batches_total", outcome="retried") >= retried + 3, 30, "batches retried"
    )
    assert logger.alive()

    db.prepare(database_url)
    wait_until(lambda: count_rows(database_url, pipeline) == (n, n), 60, f"{n} rows after the outage")
    logger.stop()


def test_long_request_ids_and_a_refused_row_never_stop_logging(
    logger: InProcessLogger,
    logger_settings: LoggerSettings,
    settings: CommonSettings,
    produce: LogProducer,
    pipeline: str,
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    other = f"{pipeline}-other"
    long_ids = [
        # 3 KB and 100 KB, random: repeated characters compress into an index entry that fits.
        log_record(pipeline, 0, request_id=secrets.token_hex(1536)),
        log_record(pipeline, 1, request_id=secrets.token_hex(50 * 1024)),
    ]
    # Decodes, but its unique-key entry is too large for Postgres's index (random: entries are compressed).
    refused_record = log_record(pipeline, 2, workspace=secrets.token_urlsafe(6000))
    refused = encode_log(refused_record)
    good = [*long_ids, *(log_record(pipeline, i) for i in range(3, 200))]
    others = [log_record(other, i) for i in range(100)]
    # Produced together, so the refused row shares its batches with good rows of both pipelines.
    produce.values(
        [*(encode_log(r) for r in good[:100]), refused, *(encode_log(r) for r in [*good[100:], *others])]
    )
    wait_until(lambda: count_rows(database_url, pipeline) == (199, 199), 60, "the pipeline's 199 good rows")
    wait_until(lambda: count_rows(database_url, other) == (100, 100), 60, "the other pipeline's rows")
    found = read_dead_letters(settings, {refused}, timeout=60)
    reason = header_value(ConsumedRecord.of(found[refused]).headers, REASON_HEADER) or ""
    assert "rejected by the postgres sink: ProgramLimitExceeded 54000: index row size" in reason, reason

    # A replay of everything (as after a crash) adds no row; markers show it has all been handled.
    produce.records([*good, *others])
    markers = f"{pipeline}-marker"
    produce.records(log_record(markers, p) for p in range(produce.partitions))
    wait_until(lambda: count_rows(database_url, markers)[0] == produce.partitions, 60, "marker rows")
    assert count_rows(database_url, pipeline) == (199, 199)
    assert count_rows(database_url, other) == (100, 100)
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT request_id FROM inference_logs WHERE pipeline = %s AND input_offset < 2 "
            "ORDER BY input_offset",
            (pipeline,),
        ).fetchall()
    assert stored == [(r["request_id"],) for r in long_ids]
    assert logger.alive()
    logger.stop()


def test_a_dead_letter_too_large_with_its_reason_goes_without_its_value(
    logger: InProcessLogger,
    logger_settings: LoggerSettings,
    settings: CommonSettings,
    produce: LogProducer,
    pipeline: str,
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    # Fits under librdkafka's message.max.bytes (1,000,000, checked on the uncompressed record) on
    # joey.logs, not with the reason and source headers added (about 140 bytes).
    marker = f"{pipeline}-too-large".encode()
    produce.values([marker + b"x" * (999_825 - len(marker))])
    produce.records([log_record(pipeline, 1)])
    consumer = Consumer(consumer_config(settings, f"logtest-dlq-{secrets.token_hex(4)}"))
    consumer.assign([TopicPartition(topics.LOGS_DEAD_LETTER, 0, OFFSET_BEGINNING)])
    found: list[ConsumedRecord] = []

    def dropped_found() -> bool:
        for message in consumer.consume(500, 0.5):
            if message.error() is None and message.value() is None:
                record = ConsumedRecord.of(message)
                if header_value(record.headers, DROPPED_HEADER) == str(999_825):
                    found.append(record)
        return bool(found)

    try:
        wait_until(dropped_found, 60, "the dead letter without its value")
    finally:
        consumer.close()
    assert "not an Avro joey.v1.InferenceLog" in (header_value(found[0].headers, REASON_HEADER) or "")
    wait_until(lambda: count_rows(database_url, pipeline) == (1, 1), 60, "the next record's row")
    assert logger.alive()
    logger.stop()


def test_a_batch_record_is_one_row_per_entry_and_a_refused_entry_is_dead_lettered_alone(
    logger: InProcessLogger,
    logger_settings: LoggerSettings,
    settings: CommonSettings,
    produce: LogProducer,
    pipeline: str,
) -> None:
    database_url = logger_settings.database_url.get_secret_value()
    records = [log_record(pipeline, i) for i in range(300)]
    refused = log_record(pipeline, 300, inputs="{not json")  # decodes, but is no jsonb
    # The refused entry sits at position 5 of the second batch record; the rest of that record is stored.
    produce.batches([*records[:100], *records[100:105], refused, *records[105:]], size=100)
    undecodable = f"undecodable batch of {pipeline}".encode()
    produce.values([undecodable], content_type=LOG_BATCH_CONTENT_TYPE)
    wait_until(lambda: count_rows(database_url, pipeline) == (300, 300), 60, "300 rows")

    letter = encode_log(refused)
    found = read_dead_letters(settings, {letter, undecodable}, timeout=60)
    alone = ConsumedRecord.of(found[letter]).headers
    assert header_value(alone, CONTENT_TYPE_HEADER) == LOG_CONTENT_TYPE
    assert header_value(alone, ENTRY_HEADER) == "5"
    assert found[letter].key() == refused["request_id"].encode()  # its own id, not its batch's first entry's
    assert "rejected by the postgres sink" in (header_value(alone, REASON_HEADER) or "")
    whole = ConsumedRecord.of(found[undecodable]).headers
    assert header_value(whole, CONTENT_TYPE_HEADER) == LOG_BATCH_CONTENT_TYPE
    assert header_value(whole, ENTRY_HEADER) is None
    assert "not an Avro joey.v1.InferenceLogBatch" in (header_value(whole, REASON_HEADER) or "")

    # A replay in batches of another size (an engine restarted with other settings) adds no row.
    produce.batches(records, size=64)
    markers = f"{pipeline}-marker"
    produce.records(log_record(markers, p) for p in range(produce.partitions))
    wait_until(lambda: count_rows(database_url, markers)[0] == produce.partitions, 60, "marker rows")
    assert count_rows(database_url, pipeline) == (300, 300)
    assert logger.alive()
    logger.stop()
