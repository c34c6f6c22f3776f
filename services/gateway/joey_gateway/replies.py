"""Replies routed to their callers by request id.

Each pipeline has one long-lived reader of its outputs and errors topics. It uses ``assign()``
on every partition and never joins a consumer group, so rebalances of the engine's group cannot
revoke anything from it: a reply is read wherever and whenever a replica writes it. The reader is
positioned before the first request is produced, so no reply can be missed. Replies nobody waits
for (older ones, or a second delivery of an at-least-once reply) are skipped.

Commit policy: none. The reader joins no group and never commits; a new reader starts at the ends.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer

from joey_core import kafka
from joey_core.records import REQUEST_ID_HEADER, header_value
from joey_core.replies import Reply, decode_reply, reply_consumer
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics

log = logging.getLogger(__name__)


class Call:
    """The replies one request waits for: one per input record."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.replies: dict[str, Reply] = {}
        self.failure: str | None = None
        self.done = threading.Event()

    def deliver(self, reply: Reply) -> None:
        self.replies.setdefault(reply.request_id, reply)
        if len(self.replies) == len(self.request_ids):
            self.done.set()

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.done.set()


class ReplyReader:
    """Reads one pipeline's replies in a thread of its own and hands each to the call waiting for it."""

    def __init__(self, settings: CommonSettings, topics: PipelineTopics) -> None:
        self.topics = topics
        self._consumer: Consumer = reply_consumer(settings, topics)
        self._waiting: dict[str, Call] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"replies-{topics.outputs}", daemon=True)
        self._thread.start()

    def expect(self, call: Call) -> None:
        with self._lock:
            for request_id in call.request_ids:
                self._waiting[request_id] = call

    def forget(self, call: Call) -> None:
        with self._lock:
            for request_id in call.request_ids:
                self._waiting.pop(request_id, None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # consume() waits out its whole timeout unless the batch fills: wait for the first reply
                # with poll, then take whatever else already arrived.
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                batch = [first, *self._consumer.consume(num_messages=1000, timeout=0)]
                for message in kafka.usable(batch, log):
                    request_id = header_value(message.headers(), REQUEST_ID_HEADER)  # type: ignore[arg-type]
                    if request_id is None:
                        continue
                    with self._lock:
                        call = self._waiting.pop(request_id, None)
                    if call is not None:
                        call.deliver(decode_reply(message, request_id, self.topics.outputs))
        except Exception:
            # The gateway replaces a reader that stopped; its waiters get their deadline error.
            log.exception("reader of %s stopped", self.topics.outputs)
        finally:
            self._consumer.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
