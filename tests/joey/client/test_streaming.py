"""The SDK's streaming path against the real broker, with a stand-in for the engine that answers each
input record on the pipeline's outputs or errors topic: some of its answers are broken."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pandas as pd
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from joey.client.calls import JoeyError
from joey.client.inputs import InputError
from joey.client.pipelines import replies_to_frame
from joey.client.streaming import MAX_TIMEOUT_S, InferenceTimeout, PipelineStream
from joey_core import kafka, records, topics
from joey_core.replies import failed_reply
from joey_core.settings import CommonSettings
from tests.conftest import wait_until

WORKSPACE = "streaming"
BROKEN = {1: b'{"time": "2025-05-01T09:00:00+00:00", "out": {"doub', 2: b"[1, 2]", 3: b'{"in": "\xff"}'}
"""What the stand-in writes on the outputs topic for the records with these ids."""
REFUSED = 4
"""The id of the record the stand-in answers with an error record."""
SILENT = 99
"""The id of the record the stand-in never answers."""


def answer(names: topics.PipelineTopics, message: Message) -> tuple[str, bytes]:
    """The topic and value of the stand-in's reply to an input record."""
    row = json.loads(message.value())  # type: ignore[arg-type]
    request_id = records.header_value(message.headers(), records.REQUEST_ID_HEADER)  # type: ignore[arg-type]
    now = datetime.now(UTC).isoformat()
    if row["id"] in BROKEN:
        return names.outputs, BROKEN[row["id"]]
    if row["id"] == REFUSED:
        body = {
            "time": now,
            "request_id": request_id,
            "error": "x is too large",
            "input": row,
            "metadata": {},
        }
        return names.errors, records.dumps(body)
    out = {"double": 2 * row["x"]}
    body = {
        "time": now,
        "request_id": request_id,
        "in": row,
        "out": out,
        "check_failures": [],
        "metadata": {},
    }
    return names.outputs, records.dumps(body)


@contextmanager
def stand_in_engine(settings: CommonSettings, names: topics.PipelineTopics) -> Iterator[list[BaseException]]:
    """Answers every record of the inputs topic until the block ends; yields the errors it stopped on."""
    partitions = kafka.topic_partitions(kafka.admin_client(settings), [names.inputs])[names.inputs]
    consumer = Consumer(kafka.consumer_config(settings, f"stand-in-{secrets.token_hex(4)}"))
    consumer.assign([TopicPartition(names.inputs, p, OFFSET_BEGINNING) for p in range(partitions)])
    producer = Producer(kafka.producer_config(settings))
    stop = threading.Event()
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            while not stop.is_set():
                for message in consumer.consume(100, 0.1):
                    assert message.error() is None, message.error()
                    if json.loads(message.value())["id"] == SILENT:  # type: ignore[arg-type]
                        continue
                    topic, value = answer(names, message)
                    producer.produce(topic, value, message.key(), headers=message.headers())
                producer.flush(10)
        except BaseException as exc:
            failures.append(exc)
            raise

    thread = threading.Thread(target=serve, name="stand-in-engine", daemon=True)
    thread.start()
    try:
        yield failures
    finally:
        stop.set()
        thread.join(30)
        consumer.close()


@contextmanager
def opened(settings: CommonSettings, names: topics.PipelineTopics) -> Iterator[PipelineStream]:
    with closing(PipelineStream(settings, names)) as stream:
        yield stream


def test_a_broken_reply_fails_its_own_row_and_the_others_are_answered(settings: CommonSettings) -> None:
    pipeline = f"broken-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    rows = [{"id": i, "x": float(i)} for i in range(6)]
    started = pd.Timestamp.now(tz=UTC)
    with stand_in_engine(settings, names) as failures, opened(settings, names) as stream:
        replies = stream.infer(rows, timeout=30)
    assert failures == []
    assert [r.ok for r in replies] == [True, False, False, False, False, True]
    frame = replies_to_frame(replies)
    errors = frame["error"].tolist()
    assert errors[1].startswith(f"reply on {names.outputs} is not valid JSON: "), errors[1]
    assert errors[2] == f"reply on {names.outputs} is not a JSON object but list"
    assert errors[3].startswith(f"reply on {names.outputs} is not valid JSON: 'utf-8' codec"), errors[3]
    assert errors[4] == "x is too large"
    assert frame["error"].isna().tolist() == [True, False, False, False, False, True]
    assert frame["out.double"].tolist() == [0.0, pd.NA, pd.NA, pd.NA, pd.NA, 10.0]
    assert frame["request_id"].tolist() == [r.request_id for r in replies]
    # A broken reply is dated by when it was written, like the error records the engine writes.
    assert all(started <= t <= pd.Timestamp.now(tz=UTC) for t in frame["time"][1:4]), frame["time"]


def test_more_rows_than_the_producer_queue_holds_are_all_sent_and_answered(
    settings: CommonSettings,
) -> None:
    # A producer queue of 5 messages stands in for the default 100,000, past which a produce raised
    # BufferError after part of the rows had gone out: the same back-pressure path, in seconds.
    pipeline = f"many-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    small_queue = settings.model_copy(
        update={"kafka_config": {"queue.buffering.max.messages": 5, "linger.ms": 50}}
    )
    rows = [{"id": 1000 + i, "x": float(i)} for i in range(200)]
    with stand_in_engine(settings, names) as failures, opened(small_queue, names) as stream:
        replies = stream.infer(rows, timeout=60)
    assert failures == []
    assert [r.body["out"]["double"] for r in replies] == [2 * row["x"] for row in rows]
    assert [r.body["in"]["id"] for r in replies] == [row["id"] for row in rows]
    assert len({r.request_id for r in replies}) == len(rows)


def test_a_row_the_producer_refuses_fails_alone_and_the_others_are_answered(
    settings: CommonSettings,
) -> None:
    pipeline = f"huge-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    rows: list[dict[str, object] | bytes] = [{"id": 10, "x": 1}, b"x" * 2_000_000, {"id": 11, "x": 2}]
    with stand_in_engine(settings, names) as errors, opened(settings, names) as stream:
        replies = stream.infer(rows, timeout=60)
    assert not errors
    assert [r.ok for r in replies] == [True, False, True]
    assert replies[1].body["error"].startswith("not sent to the pipeline: ")
    assert "too large" in replies[1].body["error"].lower()
    assert [r.body["out"]["double"] for r in (replies[0], replies[2])] == [2, 4]


def test_a_timeout_says_which_rows_were_answered_which_were_not_sent_and_which_are_waited_for(
    settings: CommonSettings,
) -> None:
    pipeline = f"silent-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    rows: list[dict[str, object] | bytes] = [{"id": 20, "x": 1}, {"id": SILENT, "x": 2}, b"x" * 2_000_000]
    with (
        stand_in_engine(settings, names) as errors,
        opened(settings, names) as stream,
        pytest.raises(InferenceTimeout) as info,
    ):
        # Long enough for the stand-in's answer; the silent row costs the whole of it.
        stream.infer(rows, timeout=5)
    assert not errors
    answered, silent, too_large = info.value.replies
    assert answered is not None and answered.ok and answered.body["out"] == {"double": 2}
    assert silent is None
    assert too_large is not None and not too_large.ok
    assert too_large.body["error"].startswith("not sent to the pipeline: ")
    assert (info.value.answered, info.value.total) == (2, 3)
    # The silent row's id too, so that its caller can look for it in the logs (it may yet be processed).
    ids = info.value.request_ids
    assert [ids[0], ids[2]] == [answered.request_id, too_large.request_id] and len(set(ids)) == 3


def test_rows_still_queued_when_the_time_is_up_fail_as_not_sent(settings: CommonSettings) -> None:
    # An inputs topic that does not exist: the producer holds the rows in its queue waiting for the
    # topic, and none ever leaves. They must come back failed as not sent, not waited for as if sent.
    pipeline = f"nowhere-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    nowhere = replace(names, inputs=f"joey.{WORKSPACE}.missing-{secrets.token_hex(4)}.inputs")
    no_topic_creation = settings.model_copy(update={"kafka_config": {"allow.auto.create.topics": False}})
    with opened(no_topic_creation, nowhere) as stream:
        replies = stream.infer([{"id": 30, "x": 1}, {"id": 31, "x": 2}], timeout=3)
    assert [r.ok for r in replies] == [False, False]
    assert all(r.body["error"].startswith("not sent to the pipeline: ") for r in replies), replies


def test_a_call_that_gave_up_does_not_keep_later_calls_from_purging_and_says_what_never_left(
    settings: CommonSettings,
) -> None:
    # Two calls on one stream to an inputs topic that does not exist: their rows stay queued. The first
    # to give up cannot purge (the other's rows share the queue); its rows are then waited for no more,
    # so the other call, and any later one, purges its own rows as not sent.
    pipeline = f"nowhere-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    nowhere = replace(names, inputs=f"joey.{WORKSPACE}.missing-{secrets.token_hex(4)}.inputs")
    no_topic_creation = settings.model_copy(update={"kafka_config": {"allow.auto.create.topics": False}})
    with opened(no_topic_creation, nowhere) as stream:
        longer: list[object] = []
        thread = threading.Thread(
            target=lambda: longer.append(stream.infer([{"id": 40}, {"id": 41}], timeout=5))
        )
        thread.start()
        wait_until(lambda: stream._unreported == 2, 10, "the longer call's rows queued")  # noqa: SLF001
        with pytest.raises(InferenceTimeout) as info:
            stream.infer([{"id": 42}, {"id": 43}], timeout=1)
        thread.join(30)
        later = stream.infer([{"id": 44}], timeout=1)
    assert (info.value.pending, info.value.unsent, len(info.value.request_ids)) == ([0, 1], [], 2)
    assert len(longer) == 1 and isinstance(longer[0], list), longer
    for replies in (longer[0], later):
        assert all(not r.ok and r.body["error"].startswith("not sent to the pipeline: ") for r in replies)


def test_a_timeout_names_the_rows_that_never_left() -> None:
    replies = [None, failed_reply("b", "not sent to the pipeline: x", "t"), None]
    timeout = InferenceTimeout(replies, 3, ["a", "b", "c"], {"b"})
    assert (timeout.request_ids, timeout.unsent, timeout.pending) == (["a", "b", "c"], [1], [0, 2])


def test_a_closed_stream_refuses_a_call_clearly_and_a_timeout_past_the_delivery_time_is_refused(
    settings: CommonSettings,
) -> None:
    pipeline = f"closed-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    with opened(settings, names) as stream, pytest.raises(InputError, match="more than the"):
        stream.infer([{"id": 50}], timeout=MAX_TIMEOUT_S + 1)
    with pytest.raises(JoeyError, match="client is closed"):
        stream.infer([{"id": 51}], timeout=1)


def test_calls_after_a_call_that_purged_its_queue_are_all_answered(settings: CommonSettings) -> None:
    # A call whose time is up purges the rows it still has queued. An idempotent producer then bumps its
    # epoch, which the embedded broker answered by fencing it for good: every later call on the stream
    # failed all its rows as not sent (PRODUCER_FENCED), until the client was closed.
    pipeline = f"purged-{secrets.token_hex(4)}"
    names = topics.pipeline_topics(WORKSPACE, pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, WORKSPACE, pipeline)
    )
    purges = 0
    with stand_in_engine(settings, names) as failures, opened(settings, names) as stream:
        for round_ in range(6):
            purges += bool(purged_rows(stream, [{"id": 100 + i, "x": 1.0} for i in range(2000)]))
            replies = stream.infer([{"id": 3000 + round_, "x": float(round_)}] * 3, timeout=30)
            assert [r.body.get("error") for r in replies] == [None] * 3, f"after {purges} purges"
            assert [r.body["out"]["double"] for r in replies] == [2.0 * round_] * 3
    assert failures == []
    assert purges >= 3, "rows still queued after 1 ms are purged"


def purged_rows(stream: PipelineStream, rows: list[dict[str, object]]) -> list[int]:
    """The positions of ``rows`` that a call given 1 ms purged from the producer's queue."""
    try:
        replies = stream.infer(rows, timeout=0.001)
    except InferenceTimeout as timeout:
        return timeout.unsent
    return [i for i, r in enumerate(replies) if "_PURGE_QUEUE" in r.body.get("error", "")]
