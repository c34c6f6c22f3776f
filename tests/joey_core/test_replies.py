"""The reader of a pipeline's replies that the gateway and the SDK share, against the real broker."""

from __future__ import annotations

import secrets

from confluent_kafka import Producer

from joey_core import kafka, records, topics
from joey_core.replies import Call, ReplyReader
from joey_core.settings import CommonSettings


def test_a_reply_that_is_not_json_fails_its_row_and_the_reader_reads_on(settings: CommonSettings) -> None:
    pipeline = f"replies-{secrets.token_hex(4)}"
    names = topics.pipeline_topics("gateway", pipeline)
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, "gateway", pipeline)
    )
    reader = ReplyReader(settings, names)
    try:
        call = Call(["broken", "good"])
        reader.expect(call)
        producer = Producer(kafka.producer_config(settings))
        for request_id, value in (("broken", b'{"out": {"y": '), ("good", b'{"out": {"y": 1}}')):
            producer.produce(names.outputs, value, headers=[(records.REQUEST_ID_HEADER, request_id.encode())])
        assert producer.flush(10) == 0
        assert call.done.wait(30), f"replies delivered: {sorted(call.replies)}"
        broken, good = call.replies["broken"], call.replies["good"]
        assert not broken.ok
        assert broken.body["error"].startswith(f"reply on {names.outputs} is not valid JSON: "), broken.body
        assert good.ok and good.body == {"out": {"y": 1}}
        assert reader.alive
    finally:
        reader.close()
